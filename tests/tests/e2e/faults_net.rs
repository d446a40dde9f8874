//! Faults of the network, of etcd and of agents, injected for real on loopback: the QUIC path between agent
//! and coordinator cut for 30 s mid-backup (a UDP relay dropping every datagram), one bit flipped in etcd's
//! snapshot stream on its way to the agent (an HTTP/2 proxy), the etcd leader moved and the backed-up member
//! stopped mid-backup, agents whose clocks run an hour ahead or behind (libfaketime), and a hostile agent
//! streaming a decompression bomb into the local store. For each: no corrupt or partial backup listed, no
//! partial file left, the status and a metric say what happened, and the next backup succeeds (restored with
//! etcd's own tools). docs/FAULTS.md keeps the table, with the times printed here as `FAULT …` lines.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_common::protocol::{write_frame, JobMsg};
use serde_json::Value;

use crate::fixtures::ferry::{STATUS_ERROR, STATUS_OK, STATUS_RUNNING};
use crate::fixtures::h2_corrupter::H2Corrupter;
use crate::fixtures::hostile::HostileAgent;
use crate::fixtures::ports::free_port;
use crate::fixtures::tools::etcd_tool;
use crate::fixtures::udp_relay::UdpRelay;
use crate::fixtures::{
    assert_same_kvs, files_under, manual_backup_yaml, restore_and_read_raw, unix_now, Agent, Coordinator,
    CoordinatorOptions, EtcdCluster, TEST_PREFIX,
};
use crate::least_privilege::sane_facts;
use crate::observe::http_get;

const BACKUP_TIMEOUT: Duration = Duration::from_secs(120);
/// libfaketime as Debian's `libfaketime` installs it (tests/setup.sh).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `--metrics-listen` on a fresh port plus `extra`; returns the options and the port.
fn with_metrics(mut options: CoordinatorOptions, extra: &[&str]) -> (CoordinatorOptions, u16) {
    let port = free_port();
    options.extra_args.extend(["--metrics-listen".to_owned(), format!("127.0.0.1:{port}")]);
    options.extra_args.extend(extra.iter().map(|a| (*a).to_owned()));
    (options, port)
}

/// The value of `name{cluster="CLUSTER",…}` with every label of `labels` on the coordinator's metrics port.
fn metric(port: u16, name: &str, cluster: &str, labels: &[&str]) -> anyhow::Result<Option<f64>> {
    let (_, body) = http_get(port, "/metrics")?;
    let cluster_label = format!("cluster=\"{cluster}\"");
    Ok(body.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let ours = series.starts_with(&format!("{name}{{"))
            && series.contains(&cluster_label)
            && labels.iter().all(|x| series.contains(x));
        ours.then(|| value.parse().ok()).flatten()
    }))
}

/// Failed backups of `cluster` counted by the coordinator.
fn failures_counted(port: u16, cluster: &str) -> anyhow::Result<f64> {
    Ok(metric(port, "ferry_backups_total", cluster, &["result=\"error\""])?.unwrap_or(0.0))
}

/// Asks for a backup of `cluster` now (in a new second, so it is a new request) and waits for its final status.
async fn backup(coordinator: &Coordinator, cluster: &str) -> anyhow::Result<Value> {
    let before = coordinator.backup_status(cluster).await.unwrap_or(Value::Null);
    let at = unix_now();
    while unix_now() <= at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    coordinator.ctl().apply_yaml(&manual_backup_yaml(cluster, unix_now(), 0)).await?.ok()?;
    if before["lastbackupattempt"].is_null() {
        coordinator.wait_backup_status(cluster, BACKUP_TIMEOUT).await
    } else {
        coordinator.wait_next_backup_status(cluster, &before, BACKUP_TIMEOUT).await
    }
}

/// Every file of the local store, hidden partial files included.
fn store_files(coordinator: &Coordinator) -> Vec<String> {
    files_under(&coordinator.store_dir()).unwrap_or_default().iter().map(|p| p.display().to_string()).collect()
}

/// The newest backup of `cluster`, downloaded, restored with etcd's tools and read back: it must hold exactly
/// the random values written.
async fn assert_newest_restores(
    coordinator: &Coordinator,
    cluster: &str,
    written: &std::collections::HashMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    let backups = coordinator.backups(cluster).await?;
    let id = backups.first().and_then(|b| b["metadata"]["id"].as_str()).context("no backup listed")?;
    let out = coordinator.dir().join(format!("{id}.db"));
    coordinator.download_backup(cluster, id, &out, true).await?;
    let restored = restore_and_read_raw(&out).await?;
    let restored: std::collections::HashMap<String, Vec<u8>> =
        restored.into_iter().filter(|(k, _)| k.starts_with(&format!("{TEST_PREFIX}random-"))).collect();
    assert_same_kvs(written, &restored, "the restored backup");
    std::fs::remove_file(&out)?;
    Ok(())
}

/// The port of an `http://127.0.0.1:PORT` URL.
fn url_addr(url: &str) -> anyhow::Result<SocketAddr> {
    url.trim_start_matches("http://").parse().with_context(|| format!("not http://IP:PORT: {url}"))
}

/// Cut for longer than QUIC's idle timeout (20 s, `ferry_common::tls::IDLE_TIMEOUT`): both ends give the
/// connection up, so the backup must fail cleanly — not hang, not commit — and the agent must dial again.
#[tokio::test]
async fn quic_path_cut_for_30s_mid_backup_fails_cleanly_and_the_agent_comes_back() -> anyhow::Result<()> {
    const CLUSTER: &str = "cut";
    const CUT: Duration = Duration::from_secs(30);
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(40 << 20, 1).await?;
    let port = free_port();
    let relay = UdpRelay::start(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    // 40 Mbit/s: the 40 MiB snapshot takes about 8 s to cross, so the cut lands mid-flight.
    let (options, metrics) = with_metrics(
        CoordinatorOptions { port: Some(port), agent_coordinator: Some(relay.addr()), ..Default::default() },
        &["--upload-limit-mbps", "40"],
    );
    let coordinator = Coordinator::start(options).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
    let running = coordinator.wait_backup_running(CLUSTER, BACKUP_TIMEOUT).await?;
    relay.cut();
    let cut_at = Instant::now();
    // During the cut the job must end by itself, failed (QUIC's idle timeout), well before the cut ends.
    let status = coordinator.wait_backup_status(CLUSTER, CUT).await?;
    let failed_after = cut_at.elapsed();
    tokio::time::sleep(CUT.saturating_sub(cut_at.elapsed())).await;
    relay.restore();
    let restored_at = Instant::now();
    assert_eq!(status["status"], STATUS_ERROR, "a 30 s cut fails the backup: {status:#}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "the status says why: {status:#}");
    assert!(relay.dropped() > 0, "the relay dropped datagrams");
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed after the cut");
    assert!(store_files(&coordinator).is_empty(), "no partial file left: {:?}", store_files(&coordinator));
    assert_eq!(failures_counted(metrics, CLUSTER)?, 1.0, "the failure is counted");

    // The agent dials again by itself once the path is back.
    coordinator.wait_agents_connected(CLUSTER, &["m1"], Duration::from_secs(90)).await?;
    let reconnected = restored_at.elapsed();
    let status = backup(&coordinator, CLUSTER).await?;
    assert_eq!(status["status"], STATUS_OK, "the backup after the cut succeeds: {status:#}");
    let recovered = restored_at.elapsed();
    assert_newest_restores(&coordinator, CLUSTER, &written).await?;
    assert_eq!(store_files(&coordinator).len(), 2, "one object and its manifest: {:?}", store_files(&coordinator));
    eprintln!(
        "FAULT quic-cut: cut at {} bytes done; failed {failed_after:?} into the cut: {error}; agent back \
         {reconnected:?} after the cut, next backup ok {recovered:?} after it",
        running["bytesdone"]
    );
    Ok(())
}

#[tokio::test]
async fn a_bit_flipped_in_etcds_snapshot_stream_is_refused_by_the_agent() -> anyhow::Result<()> {
    const CLUSTER: &str = "flip";
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(8 << 20, 2).await?;
    let proxy = H2Corrupter::start(url_addr(etcd.member(0).client_url())?).await?;
    let (options, metrics) = with_metrics(CoordinatorOptions::default(), &[]);
    let coordinator = Coordinator::start(options).await?;
    let creds = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;
    let _agent = Agent::start(&coordinator, &creds, &proxy.url())?;
    coordinator.wait_agents_connected(CLUSTER, &["m1"], BACKUP_TIMEOUT).await?;

    // 64 messages of 32 KiB: 2 MiB into the snapshot, inside a chunk's bytes, not in any framing.
    proxy.arm(64);
    let status = backup(&coordinator, CLUSTER).await?;
    assert_eq!(proxy.flipped(), 1, "the proxy flipped one bit");
    assert_eq!(status["status"], STATUS_ERROR, "a corrupted snapshot is not a backup: {status:#}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("trailing sha256") && error.contains("does not match"),
        "the error names etcd's hash mismatch: {error}"
    );
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");
    assert!(store_files(&coordinator).is_empty(), "no partial file left: {:?}", store_files(&coordinator));
    assert_eq!(failures_counted(metrics, CLUSTER)?, 1.0, "the failure is counted");

    // The proxy passes everything now: the next backup is whole.
    let started = Instant::now();
    let status = backup(&coordinator, CLUSTER).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    let recovered = started.elapsed();
    assert_newest_restores(&coordinator, CLUSTER, &written).await?;
    eprintln!("FAULT snapshot-bit-flip: refused: {error}; next backup ok in {recovered:?}");
    Ok(())
}

/// etcd's leader id and every member's (name, id), from the running members.
async fn leader_and_members(etcd: &EtcdCluster) -> anyhow::Result<(u64, Vec<(String, u64)>)> {
    let mut client = etcd.client().await?;
    let status = client.status().await.map_err(|e| anyhow::anyhow!("etcd status: {e:?}"))?;
    let members = client.member_list().await.map_err(|e| anyhow::anyhow!("etcd member list: {e:?}"))?;
    Ok((status.leader(), members.members().iter().map(|m| (m.name().to_owned(), m.id())).collect()))
}

#[tokio::test]
async fn leader_moved_then_backed_up_member_stopped_mid_backup() -> anyhow::Result<()> {
    const CLUSTER: &str = "moving";
    let mut etcd = EtcdCluster::start(3).await?;
    let written = etcd.put_random_values(30 << 20, 3).await?;
    // 40 Mbit/s: about 6 s per backup, time to act mid-stream.
    let (options, metrics) = with_metrics(CoordinatorOptions::default(), &["--upload-limit-mbps", "40"]);
    let coordinator = Coordinator::start(options).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    // The leader moves while a member streams its snapshot: the stream is that member's own bbolt read, so
    // the backup goes on.
    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
    coordinator.wait_backup_running(CLUSTER, BACKUP_TIMEOUT).await?;
    let (leader, members) = leader_and_members(&etcd).await?;
    let (_, target) = members.iter().find(|(_, id)| *id != leader).context("a follower")?;
    let out = tokio::process::Command::new(etcd_tool("etcdctl")?)
        .args(["--endpoints", &etcd.client_urls().join(","), "move-leader", &format!("{target:x}")])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "move-leader: {}", String::from_utf8_lossy(&out.stderr));
    let moved_while_running = coordinator.backup_status(CLUSTER).await?["status"] == STATUS_RUNNING;
    let status = coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert!(moved_while_running, "the leader moved while the backup ran");
    assert_eq!(status["status"], STATUS_OK, "a leader change does not fail a backup: {status:#}");
    assert_eq!(leader_and_members(&etcd).await?.0, *target, "the leader moved");
    assert_newest_restores(&coordinator, CLUSTER, &written).await?;

    // The member being backed up crashes mid-stream (SIGKILL: on SIGTERM etcd first finishes serving the
    // snapshot, and the backup simply completes): its job fails and the coordinator takes the backup from
    // another member in the same run.
    let before = coordinator.backup_status(CLUSTER).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
    let running = coordinator.wait_backup_running(CLUSTER, BACKUP_TIMEOUT).await?;
    let victim = running["member"].as_str().context("status names the member")?.to_owned();
    let index = members.iter().position(|(name, _)| *name == victim).context("the member is one of etcd's")?;
    let stopped_at = Instant::now();
    etcd.kill_member(index);
    let status = coordinator.wait_next_backup_status(CLUSTER, &before, BACKUP_TIMEOUT).await?;
    let recovered = stopped_at.elapsed();
    assert_eq!(status["status"], STATUS_OK, "another member completes the backup: {status:#}");
    // The agent may already hold the whole snapshot (HTTP/2 windows and its queues read ahead of the
    // throttled upload): the victim's backup then completes. Either way one whole backup is listed.
    let by = if status["member"] == victim.as_str() { "the killed member (already read)" } else { "another member" };
    let backups = coordinator.backups(CLUSTER).await?;
    assert_eq!(backups.len(), 2, "two whole backups listed, nothing of the broken stream");
    assert_eq!(store_files(&coordinator).len(), 4, "no partial file: {:?}", store_files(&coordinator));
    assert_newest_restores(&coordinator, CLUSTER, &written).await?;
    assert_eq!(failures_counted(metrics, CLUSTER)?, 0.0, "a failover inside a run is not a failed backup");
    if by == "another member" {
        let log = std::fs::read_to_string(coordinator.log_path())?;
        assert!(log.contains("backup from this member failed"), "the failed member's attempt is logged");
    }
    eprintln!(
        "FAULT member-down-mid-backup: {victim} killed; backup completed by {by} ({}) {recovered:?} later",
        status["member"]
    );
    Ok(())
}

/// TLS certificates are valid from January 1st of the year before their issue (`common::tls`), so an agent
/// an hour behind or ahead still handshakes; what it reports is dated by the coordinator's clock.
#[tokio::test]
async fn agents_an_hour_ahead_or_behind_back_up_and_move_no_coordinator_time() -> anyhow::Result<()> {
    if !Path::new(LIBFAKETIME).is_file() {
        eprintln!("skipped: {LIBFAKETIME} missing (install Debian's faketime: tests/setup.sh)");
        return Ok(());
    }
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let (options, metrics) = with_metrics(CoordinatorOptions::default(), &[]);
    let coordinator = Coordinator::start(options).await?;
    let mut agents = Vec::new();
    for (cluster, offset) in [("ahead", "+1h"), ("behind", "-1h")] {
        let creds = coordinator.issue_agent_credentials(cluster, "m1").await?;
        let env = [("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", offset), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")];
        agents.push(Agent::start_with_env(&coordinator, &creds, etcd.member(0).client_url(), &env)?);
        coordinator.wait_agents_connected(cluster, &["m1"], BACKUP_TIMEOUT).await?;
    }
    for (cluster, skew) in [("ahead", 3600), ("behind", -3600)] {
        let status = backup(&coordinator, cluster).await?;
        assert_eq!(status["status"], STATUS_OK, "{cluster}: {status:#}");
        let now = unix_now();
        let backups = coordinator.backups(cluster).await?;
        let spec = &backups[0]["spec"];
        let created = spec["createdat"]["seconds"].as_i64().unwrap_or_default();
        let started = spec["startedat"]["seconds"].as_i64().unwrap_or_default();
        assert!((now - created).abs() < 120, "{cluster}: createdat is the coordinator's clock: {spec:#}");
        assert!(
            (started - created - skew).abs() < 120,
            "{cluster}: the agent's own clock is {skew} s off (its startedat, kept as reported): {spec:#}"
        );
        for field in ["lastbackuptime", "lastbackupattempt"] {
            let t = status[field]["seconds"].as_i64().unwrap_or_default();
            assert!((now - t).abs() < 120, "{cluster}: {field} is the coordinator's clock: {status:#}");
        }
        let last = metric(metrics, "ferry_backup_last_success_timestamp_seconds", cluster, &[])?.unwrap_or_default();
        assert!((now as f64 - last).abs() < 120.0, "{cluster}: the last-success metric is the coordinator's clock");
    }
    for agent in &mut agents {
        agent.check_running()?;
    }
    eprintln!("FAULT clock-skew: agents at +1h and -1h connected and backed up; times are the coordinator's");
    Ok(())
}

#[tokio::test]
async fn a_hostile_agents_decompression_bomb_stops_at_the_size_limit() -> anyhow::Result<()> {
    const CLUSTER: &str = "bomb";
    const LIMIT_MIB: u64 = 64;
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(4 << 20, 5).await?;
    let (options, metrics) = with_metrics(CoordinatorOptions::default(), &["--max-snapshot-size-mib", "64"]);
    let coordinator = Coordinator::start(options).await?;
    let creds = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    let facts = sane_facts(1);
    evil.report(facts.clone()).await?;
    coordinator.wait_agents_connected(CLUSTER, &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One zstd frame of 256 MiB of zeros is a few KiB; sent 64 times over it inflates to 16 GiB.
    let frame = zstd::encode_all(&vec![0u8; 256 << 20][..], 3)?;
    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(facts)).await?;
    let sent_at = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        for _ in 0..64 {
            if write_frame(&mut job.send, &JobMsg::Data(frame.clone())).await.is_err() {
                break;
            }
            sent += 256 << 20;
        }
        sent
    });
    let status = coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    let refused_after = sent_at.elapsed();
    sender.abort();
    assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{}-byte limit", LIMIT_MIB << 20)) && error.contains("--max-snapshot-size-mib"),
        "the error names the limit and the flag: {error}"
    );
    assert!(refused_after < Duration::from_secs(30), "stopped at the limit, not after 16 GiB: {refused_after:?}");
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");
    assert!(store_files(&coordinator).is_empty(), "no partial file left: {:?}", store_files(&coordinator));
    assert_eq!(failures_counted(metrics, CLUSTER)?, 1.0, "the failure is counted");

    // The real agent of that member takes over; its backup goes through under the limit.
    evil.close().await;
    let _agent = Agent::start(&coordinator, &creds, etcd.member(0).client_url())?;
    coordinator.wait_agents_connected(CLUSTER, &["m1"], BACKUP_TIMEOUT).await?;
    let status = backup(&coordinator, CLUSTER).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    assert_newest_restores(&coordinator, CLUSTER, &written).await?;
    eprintln!("FAULT zstd-bomb: refused {refused_after:?} after the first byte: {error}");
    Ok(())
}
