//! The continuous change log (issue 30): every etcd revision between full backups, stored in segments by one
//! watcher per cluster, read back with `ferryctl changes`; a watcher that dies is replaced from the covered
//! revision; history compacted away while nobody watched is a recorded gap closed by a full backup; and a
//! stolen node can only add to its own cluster's log, in order, while it is the watcher.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use ferry_common::presigned::PresignedClient;
use ferry_common::protocol::{
    expect_frame, read_frame, write_frame, JobRequest, SegmentInfo, SegmentTarget, WatchMsg, WatchReply,
};
use serde_json::{json, Value};

use crate::fixtures::hostile::HostileAgent;
use crate::fixtures::logs::log_tail;
use crate::fixtures::{poll_until, Coordinator, CoordinatorOptions, EtcdCluster, S3Server};
use crate::least_privilege::sane_facts;

const CLUSTER: &str = "prod";
const COVER_TIMEOUT: Duration = Duration::from_secs(90);

/// Turns the change log on for `cluster` (no automatic backups: only the tests' and the gaps' own run).
pub(crate) async fn enable(c: &Coordinator, cluster: &str) -> anyhow::Result<()> {
    let mut r = c.ctl().get_json("cluster", Some(cluster)).await?;
    r["spec"]["backupconfiguration"] = json!({
        "pointintime": { "enabled": true, "window": { "seconds": 86400, "nanos": 0 } },
    });
    c.ctl().apply_yaml(&serde_json::to_string(&r)?).await?.ok()?;
    Ok(())
}

pub(crate) async fn pitr(c: &Coordinator, cluster: &str) -> anyhow::Result<Value> {
    Ok(c.backup_status(cluster).await?["pointintime"].clone())
}

/// Waits until the log has started; returns its first revision.
pub(crate) async fn wait_started(c: &Coordinator, cluster: &str) -> anyhow::Result<i64> {
    poll_until("the change log to start", COVER_TIMEOUT, Duration::from_millis(200), || async {
        let p = pitr(c, cluster).await?;
        Ok(p["startrevision"].as_i64().filter(|r| *r > 0))
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 40)))
}

/// Waits until every revision up to `revision` is covered; returns the status.
pub(crate) async fn wait_covered(c: &Coordinator, cluster: &str, revision: i64) -> anyhow::Result<Value> {
    poll_until(&format!("revision {revision} covered"), COVER_TIMEOUT, Duration::from_millis(250), || async {
        let p = pitr(c, cluster).await?;
        Ok((p["coveredrevision"].as_i64().unwrap_or(0) >= revision).then_some(p))
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 60)))
}

pub(crate) async fn revision(etcd: &EtcdCluster) -> anyhow::Result<i64> {
    let mut client = etcd.client().await?;
    let r = client.get("/", None).await.map_err(|e| anyhow::anyhow!("get: {e:?}"))?;
    r.header().map(|h| h.revision()).context("revision")
}

/// `ferryctl changes CLUSTER -o json`, one object per row.
pub(crate) async fn changes(c: &Coordinator, cluster: &str, extra: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut args = vec!["changes", cluster, "-o", "json", "--limit", "100000"];
    args.extend_from_slice(extra);
    let out = c.ctl().run(&args).await?.ok()?;
    out.stdout.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Rows per revision, asserting each revision of `from..=to` is there.
fn by_revision(rows: &[Value], from: i64, to: i64) -> BTreeMap<i64, Vec<Value>> {
    let mut out: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for r in rows {
        out.entry(r["revision"].as_i64().unwrap_or(-1)).or_default().push(r.clone());
    }
    let missing: Vec<i64> = (from..=to).filter(|r| !out.contains_key(r)).collect();
    assert!(missing.is_empty(), "revisions missing from the change log: {missing:?}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_revision_lands_in_the_change_log_with_transactions_leases_and_deletes() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    let c = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    enable(&c, CLUSTER).await?;
    let start = wait_started(&c, CLUSTER).await?;
    // A full backup before the changes and one after: the log between them is checked against the second.
    let first_backup = backup(&c, None).await?;

    let mut client = etcd.client().await?;
    for i in 0..20 {
        client.put(format!("/registry/pods/default/p{i}"), format!("v{i}"), None).await?;
    }
    for i in 0..5 {
        client.delete(format!("/registry/pods/default/p{i}"), None).await?;
    }
    // One transaction of 50 keys: one revision, never split.
    let ops: Vec<etcd_client::TxnOp> = (0..50)
        .map(|i| etcd_client::TxnOp::put(format!("/registry/configmaps/default/c{i}"), vec![b'x'; 100], None))
        .collect();
    client.txn(etcd_client::Txn::new().and_then(ops)).await?;
    let lease = client.lease_grant(60, None).await?.id();
    client.put("/registry/leases/l1", "held", Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    client.lease_revoke(lease).await?;
    client.put("/registry/secrets/big", vec![7u8; 100 * 1024], None).await?;
    let last = revision(&etcd).await?;
    backup(&c, Some(&first_backup)).await?;

    let status = wait_covered(&c, CLUSTER, last).await?;
    assert!(status["segments"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert_eq!(status["gaps"], json!([]), "{status}");
    let rows = changes(&c, CLUSTER, &[]).await?;
    let revs = by_revision(&rows, start, last);
    let txn = revs.values().find(|r| r.len() == 50).context("the 50-key transaction as one revision")?;
    assert!(txn.iter().all(|r| r["op"] == "put" && r["value_size"] == 100), "{txn:?}");
    let deletes = rows.iter().filter(|r| r["op"] == "delete").count();
    assert_eq!(deletes, 6, "5 deletes and the lease's key revoked: {rows:?}");
    assert!(rows.iter().any(|r| r["key"] == "/registry/secrets/big" && r["value_size"] == 100 * 1024));
    // A prefix narrows the listing.
    let pods = changes(&c, CLUSTER, &["--prefix", "/registry/pods/"]).await?;
    assert_eq!(pods.len(), 25, "{pods:?}");

    // The segments are in the store under the cluster, named by their revisions.
    let log_dir = c.store_dir().join(CLUSTER).join("log");
    let names: Vec<String> = crate::fixtures::files_under(&log_dir)?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert!(!names.is_empty() && names.iter().all(|n| n.ends_with(".fseg")), "{names:?}");
    // A lease alive at a segment's cut is recorded beside the changes with its TTL (leases are not in the
    // watch stream; a lease revoked at once shows only as its keys' delete).
    let lease2 = client.lease_grant(300, None).await?.id();
    client.put("/registry/leases/l2", "held", Some(etcd_client::PutOptions::new().with_lease(lease2))).await?;
    let last = revision(&etcd).await?;
    wait_covered(&c, CLUSTER, last).await?;
    let mut granted = HashMap::new();
    for p in crate::fixtures::files_under(&log_dir)? {
        let plain = zstd::decode_all(&std::fs::read(&p)?[..])?;
        ferry_common::segment::SegmentReader::new(&plain[..]).for_each(|r| {
            if let ferry_common::segment::Record::Lease(l) = r {
                granted.insert(l.id, l.granted_ttl);
            }
        })?;
    }
    assert_eq!(granted.get(&lease2), Some(&300), "lease {lease2:x} recorded with its TTL: {granted:?}");

    // The log between the two full backups rebuilds the second exactly (every key, value, revision, version).
    let check = poll_until(
        "the log checked against the full backups",
        Duration::from_secs(180),
        Duration::from_secs(1),
        || async {
            let v = pitr(&c, CLUSTER).await?["verification"].clone();
            Ok((!v.is_null()).then_some(v))
        },
    )
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 60)))?;
    assert_eq!(check["result"], crate::fixtures::STATUS_OK, "{check}");
    let newest = c.backups(CLUSTER).await?.first().context("backups listed")?["metadata"]["id"].clone();
    assert_eq!(check["tobackup"], newest, "{check}");
    assert!(check["keys"].as_u64().unwrap_or(0) >= 60, "{check}");
    assert!(check["torevision"].as_i64().unwrap_or(0) > check["fromrevision"].as_i64().unwrap_or(0), "{check}");
    Ok(())
}

/// A manual backup, which must succeed; returns its status.
pub(crate) async fn backup(c: &Coordinator, previous: Option<&Value>) -> anyhow::Result<Value> {
    if previous.is_some() {
        // Backup ids are per second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    c.manual_backup(CLUSTER).await?;
    let status = match previous {
        Some(p) => c.wait_next_backup_status(CLUSTER, p, Duration::from_secs(60)).await?,
        None => c.wait_backup_status(CLUSTER, Duration::from_secs(60)).await?,
    };
    anyhow::ensure!(status["status"] == crate::fixtures::STATUS_OK, "backup failed: {status}");
    Ok(status)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_watcher_is_replaced_from_the_covered_revision_and_no_revision_is_lost_or_repeated() -> anyhow::Result<()>
{
    let etcd = EtcdCluster::start(3).await?;
    let s3 = S3Server::start().await?;
    let c = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let mut agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    enable(&c, CLUSTER).await?;
    let start = wait_started(&c, CLUSTER).await?;
    let first = pitr(&c, CLUSTER).await?;
    let watcher = first["watcher"].as_str().context("a watcher")?.to_owned();

    // A steady write load while the watcher's agent is killed.
    let endpoints = etcd.client_urls();
    let (stop, writer) = spawn_writer(endpoints, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let index = ["m1", "m2", "m3"].iter().position(|m| *m == watcher).context("watcher member")?;
    agents[index].kill();
    let killed_at = std::time::Instant::now();
    let epoch = first["epoch"].as_u64().unwrap_or(0);
    let next = poll_until("another watcher", Duration::from_secs(60), Duration::from_millis(250), || async {
        let p = pitr(&c, CLUSTER).await?;
        let taken = p["epoch"].as_u64().unwrap_or(0) > epoch && p["watcher"] != watcher && p["watcher"] != "";
        Ok(taken.then_some(p))
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 60)))?;
    assert!(killed_at.elapsed() < Duration::from_secs(60), "taken over in {:?}: {next}", killed_at.elapsed());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await??;
    let last = revision(&etcd).await?;
    wait_covered(&c, CLUSTER, last).await?;

    let rows = changes(&c, CLUSTER, &[]).await?;
    let revs = by_revision(&rows, start, last);
    let repeated: Vec<_> = revs.iter().filter(|(_, r)| r.len() != 1).map(|(rev, _)| *rev).collect();
    assert!(repeated.is_empty(), "revisions listed twice: {repeated:?}");
    let events = rows.iter().filter(|r| r["key"].as_str().is_some_and(|k| k.starts_with("/registry/events/"))).count();
    assert_eq!(events as u64, written, "every write is in the log exactly once");
    assert_eq!(pitr(&c, CLUSTER).await?["gaps"], json!([]));

    // The segments are in the bucket under the cluster's prefix.
    let keys = s3.aws()?.list_keys(crate::fixtures::TEST_BUCKET, &format!("backups/{CLUSTER}/log/")).await?;
    assert!(!keys.is_empty() && keys.iter().all(|k| k.ends_with(".fseg")), "{keys:?}");
    Ok(())
}

/// The watcher's etcd member killed, S3 down for a while (segments wait in the agent's spool), the coordinator
/// killed and restarted: through all of it, under a steady write load, the log keeps every revision exactly
/// once and records no gap; and once the writes stop, an idle cluster writes no more segments.
#[tokio::test(flavor = "multi_thread")]
async fn the_log_rides_out_a_dead_member_an_s3_outage_and_a_coordinator_restart() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let mut s3 = S3Server::start().await?;
    let mut c = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    enable(&c, CLUSTER).await?;
    let start = wait_started(&c, CLUSTER).await?;
    let first = pitr(&c, CLUSTER).await?;
    let watcher = first["watcher"].as_str().context("a watcher")?.to_owned();
    let index = ["m1", "m2", "m3"].iter().position(|m| *m == watcher).context("watcher member")?;

    let endpoints: Vec<String> =
        etcd.client_urls().into_iter().enumerate().filter(|(i, _)| *i != index).map(|(_, u)| u).collect();
    let (stop, writer) = spawn_writer(endpoints, Duration::from_millis(25));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 1. The watcher's member dies: another member's agent takes over.
    etcd.kill_member(index);
    poll_until("a watcher on another member", Duration::from_secs(60), Duration::from_millis(250), || async {
        let p = pitr(&c, CLUSTER).await?;
        Ok((p["watcher"] != watcher && p["watcher"] != "").then_some(()))
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 60)))?;
    // 2. S3 goes away for 20 s: segments wait on the agent's disk, then go up in order.
    s3.stop();
    tokio::time::sleep(Duration::from_secs(20)).await;
    s3.start_again().await?;
    // 3. The coordinator crashes and comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.restart(crate::fixtures::ferry::Stop::Kill).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await??;
    let mut client = crate::fixtures::etcd::connect(&etcd.running_client_urls()).await?;
    let last = client.get("/", None).await?.header().map(|h| h.revision()).context("revision")?;
    let status = wait_covered(&c, CLUSTER, last).await?;
    assert_eq!(status["gaps"], json!([]), "{status}");

    let rows = changes(&c, CLUSTER, &[]).await?;
    let revs = by_revision(&rows, start, last);
    let repeated: Vec<_> = revs.iter().filter(|(_, r)| r.len() != 1).map(|(rev, _)| *rev).collect();
    assert!(repeated.is_empty(), "revisions listed twice: {repeated:?}");
    let events = rows.iter().filter(|r| r["key"].as_str().is_some_and(|k| k.starts_with("/registry/events/"))).count();
    assert_eq!(events as u64, written, "every write is in the log exactly once");

    // 4. Idle: no new segment.
    let prefix = format!("backups/{CLUSTER}/log/");
    let before = s3.aws()?.list_keys(crate::fixtures::TEST_BUCKET, &prefix).await?;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let after = s3.aws()?.list_keys(crate::fixtures::TEST_BUCKET, &prefix).await?;
    assert_eq!(before, after, "an idle cluster writes no segment");
    let idle = pitr(&c, CLUSTER).await?;
    assert!(idle["coveredrevision"].as_i64().unwrap_or(0) >= last, "{idle}");
    Ok(())
}

/// A steady write load: one put under `/registry/events/` every `every` until the flag is set; the task
/// returns how many it wrote.
fn spawn_writer(
    endpoints: Vec<String>,
    every: Duration,
) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<anyhow::Result<u64>>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let writer = tokio::spawn(async move {
        let mut client = crate::fixtures::etcd::connect(&endpoints).await?;
        let mut i = 0u64;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            client.put(format!("/registry/events/e{i}"), format!("{i}"), None).await?;
            i += 1;
            tokio::time::sleep(every).await;
        }
        anyhow::Ok(i)
    });
    (stop, writer)
}

#[tokio::test(flavor = "multi_thread")]
async fn history_compacted_while_nobody_watched_is_a_recorded_gap_closed_by_a_full_backup() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    let port = crate::fixtures::ports::free_port();
    let options = CoordinatorOptions {
        extra_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    };
    let c = Coordinator::start(options).await?;
    let mut agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    enable(&c, CLUSTER).await?;
    wait_started(&c, CLUSTER).await?;
    let covered = wait_covered(&c, CLUSTER, revision(&etcd).await?).await?;
    assert!(covered["lastbackuptime"].is_null());

    for a in &mut agents {
        a.kill();
    }
    let mut client = etcd.client().await?;
    for i in 0..10 {
        client.put(format!("/registry/pods/p{i}"), "v", None).await?;
    }
    let compacted = revision(&etcd).await?;
    client.compact(compacted, None).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    client.put("/registry/pods/after", "v", None).await?;
    let last = revision(&etcd).await?;

    let status = wait_covered(&c, CLUSTER, last).await?;
    let gaps = status["gaps"].as_array().cloned().unwrap_or_default();
    assert_eq!(gaps.len(), 1, "{status}");
    assert!(gaps[0]["torevision"].as_i64().unwrap_or(0) >= compacted - 1, "{status}");
    let (_, metrics) = crate::observe::http_get(port, "/metrics")?;
    assert!(metrics.contains("ferry_point_in_time_gaps_total{cluster=\"prod\"} 1"), "{metrics}");
    assert!(metrics.contains("ferry_point_in_time_covered_revision{cluster=\"prod\"}"), "{metrics}");
    // The gap is closed by a full backup taken at once.
    let backed_up =
        poll_until("a full backup after the gap", Duration::from_secs(60), Duration::from_millis(250), || async {
            let s = c.backup_status(CLUSTER).await?;
            Ok((!s["lastbackuptime"].is_null()).then_some(s))
        })
        .await?;
    assert_eq!(backed_up["status"], crate::fixtures::STATUS_OK, "{backed_up}");
    // The log goes on after the gap.
    let rows = changes(&c, CLUSTER, &[]).await?;
    assert!(rows.iter().any(|r| r["key"] == "/registry/pods/after"), "{rows:?}");
    // No state inside the gap can be rebuilt: refused, naming the gap.
    let inside = gaps[0]["fromrevision"].as_i64().context("gap start")?.to_string();
    let out = c.ctl().run(&["get-key", CLUSTER, "/registry/pods/p0", "--at-revision", &inside]).await?;
    assert!(!out.success() && out.stderr.contains("inside a gap of the change log"), "{out:?}");
    Ok(())
}

/// The next watch job the hostile agent is given (a backup job is refused by dropping it).
async fn next_watch(agent: &HostileAgent) -> anyhow::Result<crate::fixtures::hostile::HostileJob> {
    loop {
        let job = agent.next_job(Duration::from_secs(30)).await?;
        if matches!(job.request, JobRequest::Watch(_)) {
            return Ok(job);
        }
    }
}

/// A segment as a hostile watcher announces it.
fn info_of(bytes: &[u8], first: i64, last: i64, prev: [u8; 32]) -> SegmentInfo {
    let digest = ferry_common::protocol::PartDigest::of(bytes);
    SegmentInfo {
        first_revision: first,
        last_revision: last,
        size: bytes.len() as u64,
        sha256: digest.sha256,
        md5: digest.md5,
        prev_sha256: prev,
        events: (last - first + 1) as u64,
        plain_bytes: bytes.len() as u64,
        first_time_ms: 0,
        last_time_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lying_watcher_adds_only_to_its_own_clusters_log_in_order_and_cannot_overwrite() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let c = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let creds = c.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&c, &creds).await?;
    evil.report(sane_facts(1)).await?;
    c.wait_agents_connected("evil", &["m1"], Duration::from_secs(30)).await?;
    enable(&c, "evil").await?;

    let mut job = next_watch(&evil).await?;
    let JobRequest::Watch(a) = &job.request else { anyhow::bail!("a watch expected: {:?}", job.request) };
    assert_eq!((a.epoch, a.from_revision), (1, 0), "{a:?}");
    assert!(matches!(a.target, SegmentTarget::S3 { .. }), "{a:?}");
    write_frame(&mut job.send, &WatchMsg::Started { from_revision: 5, member_id: 1, etcd_version: "3.5.16".into() })
        .await?;
    let seg = b"not really a segment".to_vec();
    let info = info_of(&seg, 5, 5, [0; 32]);
    write_frame(&mut job.send, &WatchMsg::Segment(info.clone())).await?;
    let WatchReply::SegmentUrl { request, .. } = expect_frame(&mut job.recv).await? else {
        anyhow::bail!("a segment URL expected")
    };
    let path = request.url.split('?').next().unwrap_or_default().to_owned();
    assert!(path.contains("/backups/evil/log/"), "the URL names only its own cluster's log: {path}");
    let http = PresignedClient::new("")?;
    http.send(&request, Bytes::from(seg.clone()), "put the segment").await?;
    // The PUT cannot replace what is stored, even with the same URL and bytes.
    let again = http.send(&request, Bytes::from(seg.clone()), "put it again").await;
    assert!(again.is_err(), "a second PUT of the same segment was accepted");
    // Nor can the URL put other bytes (its size and checksums are signed).
    let mut other = request.clone();
    other.url = other.url.replace("0000000000000005-0000000000000005", "0000000000000006-0000000000000006");
    assert!(http.send(&other, Bytes::from(seg.clone()), "put under another name").await.is_err());
    write_frame(&mut job.send, &WatchMsg::Uploaded { first_revision: 5 }).await?;
    let reply: WatchReply = expect_frame(&mut job.recv).await?;
    assert!(matches!(reply, WatchReply::Stored { first_revision: 5, last_revision: 5, .. }), "{reply:?}");

    // Skipping ahead (revision 7 after 5) is refused and ends the epoch.
    let info7 = info_of(&seg, 7, 7, info.sha256);
    write_frame(&mut job.send, &WatchMsg::Segment(info7)).await?;
    let reply: Option<WatchReply> = read_frame(&mut job.recv).await?;
    assert!(matches!(reply, Some(WatchReply::Stop { .. })), "{reply:?}");
    // The next epoch goes on from the covered revision; a segment that does not chain to the last stored one
    // is refused, and so is a claim of revisions far beyond what the other members report.
    let mut job = next_watch(&evil).await?;
    let JobRequest::Watch(a) = &job.request else { anyhow::bail!("a watch expected: {:?}", job.request) };
    assert_eq!((a.epoch, a.from_revision, a.prev_sha256), (2, 6, info.sha256), "{a:?}");
    write_frame(&mut job.send, &WatchMsg::Started { from_revision: 6, member_id: 1, etcd_version: "3.5.16".into() })
        .await?;
    write_frame(&mut job.send, &WatchMsg::Segment(info_of(&seg, 6, 6, [9; 32]))).await?;
    let reply: Option<WatchReply> = read_frame(&mut job.recv).await?;
    assert!(matches!(reply, Some(WatchReply::Stop { .. })), "a broken chain was accepted: {reply:?}");

    let creds2 = c.issue_agent_credentials("evil", "m2").await?;
    let mut honest = HostileAgent::connect(&c, &creds2).await?;
    honest.report(sane_facts(2)).await?; // revision 10
    c.wait_agents_connected("evil", &["m1", "m2"], Duration::from_secs(30)).await?;
    let (mut job, liar_is_m1) = tokio::select! {
        j = next_watch(&evil) => (j?, true),
        j = next_watch(&honest) => (j?, false),
    };
    let JobRequest::Watch(a) = &job.request else { anyhow::bail!("a watch expected: {:?}", job.request) };
    let member_id = if liar_is_m1 { 1 } else { 2 };
    write_frame(
        &mut job.send,
        &WatchMsg::Started { from_revision: a.from_revision, member_id, etcd_version: "3.5.16".into() },
    )
    .await?;
    write_frame(&mut job.send, &WatchMsg::Covered { revision: 10_000_000 }).await?;
    let reply: Option<WatchReply> = read_frame(&mut job.recv).await?;
    assert!(matches!(reply, Some(WatchReply::Stop { .. })), "a covered revision far ahead was accepted: {reply:?}");
    let status = pitr(&c, "evil").await?;
    assert_eq!(status["coveredrevision"], 5, "{status}");
    assert_eq!(status["segments"], 1, "{status}");
    Ok(())
}

/// The local store's path: the segment's bytes come on the watch stream. More bytes than announced, other
/// bytes than announced, an upload that was never announced, a gap claimed far beyond what etcd reached and a
/// failure message of a megabyte: each is refused (the epoch ends) and nothing is indexed; an agent
/// certificate cannot list any cluster's changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_lying_watcher_cannot_slip_other_bytes_or_claims_into_the_local_store() -> anyhow::Result<()> {
    let c = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = c.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&c, &creds).await?;
    evil.report(sane_facts(1)).await?;
    let creds2 = c.issue_agent_credentials("evil", "m2").await?;
    let mut other = HostileAgent::connect(&c, &creds2).await?;
    other.report(sane_facts(2)).await?; // revision 10: what a claim is weighed against
    c.wait_agents_connected("evil", &["m1", "m2"], Duration::from_secs(30)).await?;
    enable(&c, "evil").await?;

    let seg = b"segment bytes".to_vec();
    // Each attempt on a fresh epoch (whichever hostile member is given it): start, then one lie.
    type Lie = Box<dyn Fn(SegmentInfo) -> Vec<WatchMsg>>;
    let lies: Vec<(&str, Lie)> = vec![
        ("more bytes than announced", {
            let seg = seg.clone();
            Box::new(move |info| {
                vec![WatchMsg::Segment(info), WatchMsg::SegmentData(seg.clone()), WatchMsg::SegmentData(vec![1])]
            })
        }),
        ("other bytes than announced", {
            let seg = seg.clone();
            Box::new(move |info| {
                let mut forged = seg.clone();
                forged[0] ^= 1;
                vec![WatchMsg::Segment(info), WatchMsg::SegmentData(forged), WatchMsg::SegmentEnd]
            })
        }),
        (
            "an upload never announced",
            Box::new(|info: SegmentInfo| vec![WatchMsg::Uploaded { first_revision: info.first_revision }]),
        ),
        (
            "a gap beyond what etcd reached",
            Box::new(|info: SegmentInfo| {
                vec![WatchMsg::Gap { from_revision: info.first_revision, to_revision: 50_000_000, reason: "x".into() }]
            }),
        ),
        ("a megabyte of failure", Box::new(|_| vec![WatchMsg::Failed { error: "e".repeat(1 << 20) }])),
    ];
    let mut epoch = 0;
    for (what, lie) in &lies {
        let (mut job, m) = tokio::select! {
            j = next_watch(&evil) => (j?, 1),
            j = next_watch(&other) => (j?, 2),
        };
        let JobRequest::Watch(a) = &job.request else { anyhow::bail!("a watch expected") };
        assert!(a.epoch > epoch, "{what}: epochs rise: {a:?}");
        epoch = a.epoch;
        assert!(matches!(a.target, SegmentTarget::Coordinator), "{a:?}");
        let from = if a.from_revision == 0 { 5 } else { a.from_revision };
        write_frame(
            &mut job.send,
            &WatchMsg::Started { from_revision: from, member_id: m, etcd_version: "3.5.16".into() },
        )
        .await?;
        let info = info_of(&seg, from, from, a.prev_sha256);
        for msg in lie(info) {
            // The coordinator may end the stream before all of it is sent.
            if write_frame(&mut job.send, &msg).await.is_err() {
                break;
            }
        }
        let reply: Option<WatchReply> = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut job.recv))
            .await
            .with_context(|| format!("{what}: no answer"))?
            .unwrap_or(None);
        assert!(matches!(reply, None | Some(WatchReply::Stop { .. })), "{what} was not refused: {reply:?}");
    }
    let status = pitr(&c, "evil").await?;
    assert_eq!(status["segments"], 0, "{status}");
    assert_eq!(status["gaps"], json!([]), "{status}");
    assert!(status["error"].as_str().unwrap_or_default().len() < 2000, "an agent's words are cut: {status}");
    let names = crate::fixtures::files_under(&c.store_dir()).unwrap_or_default();
    assert!(names.iter().all(|p| !p.to_string_lossy().ends_with(".fseg")), "nothing stored: {names:?}");

    // An agent certificate may not read the change log, not even its own cluster's.
    let asked = crate::fixtures::hostile::agent_request(
        &c,
        &creds,
        &ferry_common::protocol::AdminRequest::Changes {
            cluster: "evil".into(),
            since_ms: None,
            until_ms: None,
            prefix: Vec::new(),
            limit: 10,
        },
    )
    .await?;
    assert!(
        matches!(asked.as_slice(), [ferry_common::protocol::AdminResponse::Error { .. }]),
        "an agent listed changes: {asked:?}"
    );
    Ok(())
}

/// With the cluster's backups encrypted, every segment is sealed with age to the same recipients (the bucket
/// never holds a value in the clear); a coordinator with `--identity` opens them for `changes` and for the
/// check against full backups.
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_clusters_log_is_sealed_and_read_back_only_with_the_identity() -> anyhow::Result<()> {
    use crate::encryption::{age_identity, encrypt_to};
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    let dir = crate::fixtures::test_dir("changelog-age")?;
    let (key, recipient) = age_identity(dir.path())?;
    let args = vec!["--identity".to_owned(), key.display().to_string()];
    let c = Coordinator::start_s3(&s3, CoordinatorOptions { extra_args: args, ..CoordinatorOptions::s3(&[]) }).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1"], Duration::from_secs(30)).await?;
    encrypt_to(&c, &[&recipient]).await?;
    enable(&c, CLUSTER).await?;
    wait_started(&c, CLUSTER).await?;
    let first = backup(&c, None).await?;
    let mut client = etcd.client().await?;
    let secret = "the-secret-value-that-must-not-be-in-the-bucket";
    for i in 0..10 {
        client.put(format!("/registry/secrets/default/s{i}"), secret, None).await?;
    }
    backup(&c, Some(&first)).await?;
    wait_covered(&c, CLUSTER, revision(&etcd).await?).await?;

    let rows = changes(&c, CLUSTER, &["--prefix", "/registry/secrets/"]).await?;
    assert_eq!(rows.len(), 10, "{rows:?}");
    // Every segment in the bucket is an age file; none holds the value.
    let prefix = format!("backups/{CLUSTER}/log/");
    let keys = s3.aws()?.list_keys(crate::fixtures::TEST_BUCKET, &prefix).await?;
    assert!(!keys.is_empty());
    for k in &keys {
        let path = s3.root().join(crate::fixtures::TEST_BUCKET).join(k);
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        assert!(bytes.starts_with(b"age-encryption.org/v1"), "{k} is not sealed with age");
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{k} holds the value in the clear");
    }
    // The check against the full backups opens the sealed segments too.
    let check = poll_until("the encrypted log checked", Duration::from_secs(180), Duration::from_secs(1), || async {
        let v = pitr(&c, CLUSTER).await?["verification"].clone();
        Ok((!v.is_null()).then_some(v))
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 60)))?;
    assert_eq!(check["result"], crate::fixtures::STATUS_OK, "{check}");
    Ok(())
}
