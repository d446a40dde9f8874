//! Highly available coordinators: three replicas share their state in a 3-member state etcd
//! (`--state-store etcd`), one leads and the others redirect agents and ferryctl to it. Killing the leader
//! mid-backup or right after a scheduled backup neither loses nor duplicates a backup, a new leader takes
//! over within 15 s, ferryctl works through any one replica, and a replica cut off from the state etcd stops
//! leading.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::fixtures::hostile::{handshake_only, redirect_answer};
use crate::fixtures::logs::log_tail;
use crate::fixtures::ports::free_port;
use crate::fixtures::{
    expected_test_kvs, poll_until, restore_and_read_raw, unix_now, Coordinator, CoordinatorOptions, EtcdCluster,
    S3Server, STATUS_OK,
};
use crate::observe::http_get;

/// The election's name under the default `--state-etcd-prefix`.
const ELECTION: &str = "/ferry/leader";
/// What the issue asks of a failover.
pub(crate) const TAKEOVER: Duration = Duration::from_secs(15);
/// Agents of a SIGKILLed leader are on the new one within this (their links time out after 4 s of silence).
const AGENTS_BACK: Duration = Duration::from_secs(15);
const MIB: usize = 1024 * 1024;

/// The replica flags for state on `state_etcd` (endpoints as given) and these replica addresses.
pub(crate) fn replica_options(endpoints: &str, addresses: &[String], extra: &[&str]) -> CoordinatorOptions {
    let all = addresses.join(",");
    let mut args = vec!["--state-store", "etcd", "--state-etcd-endpoints", endpoints, "--replica-addresses", &all];
    args.extend_from_slice(extra);
    CoordinatorOptions { agent_coordinator: Some(all.clone()), ..CoordinatorOptions::s3(&args) }
}

/// The client address of the leader, as the state etcd's election says.
pub(crate) async fn leader(state: &EtcdCluster) -> anyhow::Result<Option<String>> {
    let mut client = state.client().await?;
    Ok(match client.leader(ELECTION).await {
        Ok(resp) => resp.kv().and_then(|kv| kv.value_str().ok()).map(str::to_owned),
        Err(_) => None,
    })
}

/// Waits until the election names a leader other than `not`; returns it and how long that took.
pub(crate) async fn wait_new_leader(
    state: &EtcdCluster,
    not: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    poll_until("a new leader", timeout, Duration::from_millis(200), || async {
        Ok(leader(state).await?.filter(|l| Some(l.as_str()) != not))
    })
    .await
}

/// Starts three replicas (the first applies the S3 config) and returns them with the leader's index.
pub(crate) async fn start_replicas(
    s3: &S3Server,
    state: &EtcdCluster,
    extra: &[&str],
) -> anyhow::Result<(Vec<Coordinator>, Vec<String>)> {
    let ports = [free_port(), free_port(), free_port()];
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let endpoints = state.client_urls().join(",");
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let options = CoordinatorOptions { port: Some(*port), ..replica_options(&endpoints, &addresses, extra) };
        replicas.push(if i == 0 {
            Coordinator::start_s3(s3, options).await?
        } else {
            Coordinator::start(options).await?
        });
    }
    Ok((replicas, addresses))
}

pub(crate) fn index_of(addresses: &[String], leader: &str) -> anyhow::Result<usize> {
    addresses.iter().position(|a| a == leader).with_context(|| format!("the leader {leader} is not a replica"))
}

#[tokio::test]
async fn killing_the_leader_mid_backup_and_after_a_scheduled_backup_loses_and_duplicates_nothing() -> anyhow::Result<()>
{
    const KEYS: usize = 1000;
    const INTERVAL: i64 = 30;
    let s3 = S3Server::start().await?;
    let state = EtcdCluster::start(3).await?;
    let alpha = EtcdCluster::start(3).await?;
    alpha.put_keys(KEYS).await?;
    // 12 MiB of incompressible values at 1 MB/s: the backup runs for about 12 s.
    alpha.put_random_values(12 * MIB, 7).await?;
    let beta = EtcdCluster::start(1).await?;
    beta.put_keys(KEYS).await?;
    let (mut replicas, addresses) =
        start_replicas(&s3, &state, &["--upload-limit-mbps", "8", "--min-backup-interval", "1s"]).await?;
    let first = wait_new_leader(&state, None, TAKEOVER).await?;
    let mut lead = index_of(&addresses, &first)?;
    let _alpha_agents = replicas[lead].start_agents("alpha", &alpha).await?;
    let _beta_agents = replicas[lead].start_agents("beta", &beta).await?;

    // 1. SIGKILL the leader in the middle of a backup, driven through a follower.
    let follower = (lead + 1) % 3;
    replicas[follower].manual_backup("alpha").await?;
    replicas[follower].wait_backup_running("alpha", Duration::from_secs(60)).await?;
    replicas[lead].kill();
    let killed_at = Instant::now();
    let second = wait_new_leader(&state, Some(&first), TAKEOVER).await?;
    let took = killed_at.elapsed();
    println!("new leader {second} after {:.1}s", took.as_secs_f64());
    assert!(took <= TAKEOVER, "the new leader took {took:?}");
    let dead = lead;
    lead = index_of(&addresses, &second)?;
    // Agents notice the dead leader by their links' idle timeout and go to the new one well before the 20 s
    // QUIC idle timeout of other connections.
    replicas[lead].wait_agents_connected("alpha", &["m1", "m2", "m3"], Duration::from_secs(60)).await?;
    let back = killed_at.elapsed();
    println!("agents on the new leader {:.1}s after the kill", back.as_secs_f64());
    assert!(back <= AGENTS_BACK, "agents took {back:?} to reach the new leader");
    // The dead leader's multipart upload was recorded in the state before its id went out: the new leader
    // aborts it (S3's own view: no unfinished upload left).
    poll_until(
        "the dead leader's upload to be aborted",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async { Ok(s3.leftover_uploads().is_empty().then_some(())) },
    )
    .await
    .with_context(|| format!("left: {:?}\n{}", s3.leftover_uploads(), log_tail(replicas[lead].log_path(), 30)))?;
    // The interrupted backup is not listed; its status says why.
    let interrupted = replicas[lead].wait_backup_status("alpha", Duration::from_secs(60)).await?;
    assert_ne!(interrupted["status"], STATUS_OK, "the interrupted backup cannot have succeeded: {interrupted:#}");
    assert!(replicas[lead].backups("alpha").await?.is_empty(), "an interrupted backup is listed");
    // Agents follow to the new leader; a backup through the other survivor succeeds and restores.
    let other = (0..3).find(|i| *i != dead && *i != lead).context("a third replica")?;
    replicas[other].wait_agents_connected("alpha", &["m1", "m2", "m3"], Duration::from_secs(60)).await?;
    let before = unix_now();
    while unix_now() <= before {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replicas[other].manual_backup("alpha").await?;
    let done = replicas[other].wait_next_backup_status("alpha", &interrupted, Duration::from_secs(90)).await?;
    assert_eq!(done["status"], STATUS_OK, "the backup after the failover failed: {done:#}");
    let backups = replicas[other].backups("alpha").await?;
    assert_eq!(backups.len(), 1, "exactly one alpha backup is listed: {backups:#?}");
    let id = backups[0]["metadata"]["id"].as_str().context("backup id")?;
    let snapshot = replicas[other].dir().join("alpha.snapshot");
    replicas[other].download_backup("alpha", id, &snapshot, true).await?;
    let restored = restore_and_read_raw(&snapshot).await?;
    for (k, v) in expected_test_kvs(KEYS) {
        assert_eq!(restored.get(&k).map(Vec::as_slice), Some(v.as_bytes()), "key {k} restored from the backup");
    }

    // 2. Scheduled backups of beta every INTERVAL s; SIGKILL the leader right after one is taken.
    let mut cluster = replicas[other].ctl().get_json("cluster", Some("beta")).await?;
    cluster["spec"]["backupconfiguration"] = json!({ "interval": { "seconds": INTERVAL, "nanos": 0 }, "schedule": "" });
    replicas[other].ctl().apply_yaml(&serde_json::to_string(&cluster)?).await?.ok()?;
    let first_beta = poll_until("a scheduled beta backup", Duration::from_secs(60), Duration::from_millis(300), || {
        let ctl = &replicas[other];
        async move { Ok(ctl.backups("beta").await?.first().cloned()) }
    })
    .await?;
    let before_kill = leader(&state).await?.context("a leader")?;
    let lead2 = index_of(&addresses, &before_kill)?;
    replicas[lead2].kill();
    let third = wait_new_leader(&state, Some(&before_kill), TAKEOVER).await?;
    let survivor = (0..3).find(|i| *i != dead && *i != lead2).context("a surviving replica")?;
    assert_eq!(addresses[survivor], third, "the only live replica leads");
    // Until one interval after the first backup (less the jitter and some slack), no second backup; by
    // then plus the time agents need to come back, exactly one more.
    let created = first_beta["spec"]["createdat"]["seconds"].as_i64().context("createdat")?;
    while unix_now() < created + INTERVAL * 9 / 10 - 2 {
        let n = replicas[survivor].backups("beta").await?.len();
        assert_eq!(n, 1, "a backup of beta before its interval was up (a duplicate after the failover)");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let two = poll_until("the next scheduled beta backup", Duration::from_secs(90), Duration::from_millis(500), || {
        let r = &replicas[survivor];
        async move {
            let b = r.backups("beta").await?;
            Ok((b.len() >= 2).then_some(b))
        }
    })
    .await
    .with_context(|| format!("leader log:\n{}", log_tail(replicas[survivor].log_path(), 40)))?;
    let ids: HashSet<&str> = two.iter().filter_map(|b| b["metadata"]["id"].as_str()).collect();
    assert_eq!((two.len(), ids.len()), (2, 2), "two distinct scheduled backups: {two:#?}");
    Ok(())
}

/// Issue 27: failover nobody notices. With every agent on the leader, the leader is SIGKILLed and, as soon as
/// a new one is elected, `ferryctl backup now --wait` is run through each survivor in turn, without waiting
/// for the agents: each backup waits for them (status `waiting`) instead of failing with "no agent … is
/// connected", succeeds, and is listed exactly once.
#[tokio::test]
async fn a_backup_asked_for_right_after_the_leader_died_waits_for_its_agents_and_succeeds() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let state = EtcdCluster::start(3).await?;
    let alpha = EtcdCluster::start(3).await?;
    alpha.put_keys(500).await?;
    let (mut replicas, addresses) = start_replicas(&s3, &state, &["--min-backup-interval", "1s"]).await?;
    let first = wait_new_leader(&state, None, TAKEOVER).await?;
    let dead = index_of(&addresses, &first)?;
    let _agents = replicas[dead].start_agents("alpha", &alpha).await?;
    replicas[dead].wait_agents_connected("alpha", &["m1", "m2", "m3"], Duration::from_secs(60)).await?;
    replicas[dead].kill();
    let killed_at = Instant::now();
    let second = wait_new_leader(&state, Some(&first), TAKEOVER).await?;
    let elected = killed_at.elapsed();
    // Agents notice the dead replica (4 s idle timeout, 1 s keep-alives) and register with the new leader.
    let lead = index_of(&addresses, &second)?;
    replicas[lead].wait_agents_connected("alpha", &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    let registered = killed_at.elapsed();
    println!(
        "leader killed: new leader elected after {:.1}s, every agent registered with it after {:.1}s",
        elected.as_secs_f64(),
        registered.as_secs_f64()
    );
    assert!(
        // Measured here: 3.5-4.0 s after the election (8.5 s after the kill); the bound leaves room for a loaded
        // CI machine (targets belong in benchmarks, not in timed tests).
        registered.saturating_sub(elected.max(Duration::from_secs(4))) <= Duration::from_secs(8),
        "agents registered {:.1}s after the kill, the new leader elected after {:.1}s",
        registered.as_secs_f64(),
        elected.as_secs_f64()
    );
    let survivors: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    for (n, &through) in survivors.iter().enumerate() {
        let before = unix_now();
        while unix_now() <= before {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = replicas[through].ctl().run(&["backup", "now", "alpha", "--wait", "--timeout", "120s"]).await?;
        println!(
            "backup {} through replica {through} ({}) done {:.1}s after the kill",
            n + 1,
            if addresses[through] == second { "the new leader" } else { "a follower" },
            killed_at.elapsed().as_secs_f64()
        );
        assert!(out.success(), "backup now through a survivor after the failover failed: {out:?}");
    }
    let backups = replicas[survivors[0]].backups("alpha").await?;
    let ids: HashSet<&str> = backups.iter().filter_map(|b| b["metadata"]["id"].as_str()).collect();
    assert_eq!((backups.len(), ids.len()), (2, 2), "each backup listed exactly once: {backups:#?}");
    Ok(())
}

/// Issue 27, the scheduled variant: the leader is killed while a scheduled backup it started is uploading,
/// every agent connected to it. The new leader's schedule goes on: scheduled backups commit again within a
/// minute of the kill, and no backup is listed twice.
#[tokio::test]
async fn a_scheduled_round_in_flight_when_the_leader_dies_goes_on_through_the_new_leader() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let state = EtcdCluster::start(3).await?;
    let alpha = EtcdCluster::start(3).await?;
    alpha.put_keys(200).await?;
    // 6 MiB of incompressible values at 1 MB/s: each backup uploads for about 6 s.
    alpha.put_random_values(6 * MIB, 7).await?;
    let (mut replicas, addresses) =
        start_replicas(&s3, &state, &["--upload-limit-mbps", "8", "--min-backup-interval", "1s"]).await?;
    let first = wait_new_leader(&state, None, TAKEOVER).await?;
    let dead = index_of(&addresses, &first)?;
    let _agents = replicas[dead].start_agents("alpha", &alpha).await?;
    replicas[dead].wait_agents_connected("alpha", &["m1", "m2", "m3"], Duration::from_secs(60)).await?;
    let cluster = "metadata:\n  namespace: default\n  type: Clusters.ferry.dev\n  id: alpha\n  labels:\n    \
                   ferry.dev/cluster: alpha\nspec:\n  backupconfiguration:\n    interval:\n      seconds: 5\n      \
                   nanos: 0\n";
    replicas[dead].ctl().apply_yaml(cluster).await?.ok()?;
    replicas[dead].wait_backup_running("alpha", Duration::from_secs(60)).await?;
    replicas[dead].kill();
    let killed_at = unix_now();
    let second = wait_new_leader(&state, Some(&first), TAKEOVER).await?;
    let lead = index_of(&addresses, &second)?;
    let committed_after = poll_until(
        "two scheduled backups committed after the kill",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let backups = replicas[lead].backups("alpha").await?;
            let after: Vec<i64> = backups
                .iter()
                .filter_map(|b| b["spec"]["createdat"]["seconds"].as_i64())
                .filter(|t| *t >= killed_at)
                .collect();
            Ok((after.len() >= 2).then_some(after))
        },
    )
    .await?;
    let first_after = committed_after.iter().min().copied().unwrap_or(i64::MAX) - killed_at;
    println!("the first scheduled backup after the kill was created {first_after} s after it");
    assert!(first_after <= 60, "the schedule went on within a minute: {first_after} s");
    let backups = replicas[lead].backups("alpha").await?;
    let ids: HashSet<&str> = backups.iter().filter_map(|b| b["metadata"]["id"].as_str()).collect();
    assert_eq!(backups.len(), ids.len(), "no backup listed twice: {backups:#?}");
    // The dead leader's upload is cleaned up by the new one.
    poll_until("no multipart upload left behind", Duration::from_secs(120), Duration::from_millis(500), || async {
        Ok(s3.leftover_uploads().is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?.success();
    anyhow::ensure!(ok, "kill -{signal} {pid}");
    Ok(())
}

/// Issue 27: a deposed leader does nothing. The leader is stopped (SIGSTOP) in the middle of a backup, past
/// its lease; another replica takes over, the agents follow it and the stopped leader's upload is aborted.
/// Resumed, the old leader steps down at once: it starts, stores and deletes no backup, and the interrupted
/// backup is never listed twice. A backup through the new leader then succeeds.
#[tokio::test]
async fn a_leader_stopped_past_its_lease_does_nothing_once_resumed() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let state = EtcdCluster::start(1).await?;
    let alpha = EtcdCluster::start(1).await?;
    alpha.put_keys(200).await?;
    // 12 MiB of incompressible values at 1 MB/s: the backup runs for about 12 s.
    alpha.put_random_values(12 * MIB, 7).await?;
    let (replicas, addresses) =
        start_replicas(&s3, &state, &["--upload-limit-mbps", "8", "--min-backup-interval", "1s"]).await?;
    let first = wait_new_leader(&state, None, TAKEOVER).await?;
    let old = index_of(&addresses, &first)?;
    let _agents = replicas[old].start_agents("alpha", &alpha).await?;
    let follower = (old + 1) % 3;
    replicas[follower].manual_backup("alpha").await?;
    replicas[follower].wait_backup_running("alpha", Duration::from_secs(60)).await?;
    let pid = replicas[old].pid().context("the leader's pid")?;
    signal(pid, "STOP")?;
    let stopped = async {
        let second = wait_new_leader(&state, Some(&first), TAKEOVER).await?;
        let lead = index_of(&addresses, &second)?;
        replicas[lead].wait_agents_connected("alpha", &["m1"], Duration::from_secs(60)).await?;
        poll_until(
            "the stopped leader's upload to be aborted",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async { Ok(s3.leftover_uploads().is_empty().then_some(())) },
        )
        .await?;
        anyhow::Ok(lead)
    }
    .await;
    // Resumed whatever happened, so a failure leaves no stopped process behind.
    let log_before = std::fs::metadata(replicas[old].log_path())?.len() as usize;
    signal(pid, "CONT")?;
    let lead = stopped?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = std::fs::read(replicas[old].log_path())?;
    let after = String::from_utf8_lossy(&log[log_before.min(log.len())..]).into_owned();
    for deed in ["backup started", "backup stored", "retention deleted", "elected leader"] {
        assert!(!after.contains(deed), "the resumed old leader logged {deed:?}:\n{after}");
    }
    let listed = replicas[lead].backups("alpha").await?;
    assert!(listed.len() <= 1, "the interrupted backup is listed at most once: {listed:#?}");
    let before = listed.len();
    let previous = replicas[lead].backup_status("alpha").await?;
    let second_run = unix_now();
    while unix_now() <= second_run {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replicas[lead].manual_backup("alpha").await?;
    let done = replicas[lead].wait_next_backup_status("alpha", &previous, Duration::from_secs(90)).await?;
    assert_eq!(done["status"], STATUS_OK, "the backup through the new leader: {done:#}");
    let listed = replicas[lead].backups("alpha").await?;
    let ids: HashSet<&str> = listed.iter().filter_map(|b| b["metadata"]["id"].as_str()).collect();
    assert_eq!((listed.len(), ids.len()), (before + 1, before + 1), "{listed:#?}");
    Ok(())
}

/// Issue 26, finding 11: a follower replica admits exactly whom the leader would. Before, it redirected any
/// certificate signed by the CA (revoked ones too), without the per-identity cap, and read 16 MiB hellos.
#[tokio::test]
async fn a_follower_admits_only_whom_the_leader_would() -> anyhow::Result<()> {
    const CAP: usize = 16; // coordinator::net::MAX_CONNECTIONS_PER_IDENTITY
    let s3 = S3Server::start().await?;
    let state = EtcdCluster::start(1).await?;
    let (replicas, addresses) = start_replicas(&s3, &state, &[]).await?;
    let leader = wait_new_leader(&state, None, TAKEOVER).await?;
    let lead = index_of(&addresses, &leader)?;
    let follower = &replicas[(lead + 1) % 3];
    let creds = replicas[lead].issue_agent_credentials("evil", "m1").await?;
    let named = redirect_answer(&follower.addr(), &creds).await?;
    assert!(named.as_deref().is_some_and(|l| l.contains(&leader)), "the follower names the leader: {named:?}");

    // One certificate holding connections that never say hello: at most CAP of them on the follower too.
    let mut held = Vec::new();
    for _ in 0..CAP + 4 {
        held.push(handshake_only(&follower.addr(), &creds).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = held.iter().filter(|(_, c)| c.close_reason().is_some()).count();
    assert_eq!(closed, 4, "the follower caps one identity's connections at {CAP}");
    for (endpoint, conn) in held {
        conn.close(0u32.into(), b"done");
        endpoint.close(0u32.into(), b"done");
    }

    // Revoked: the follower refuses it too, instead of telling it where the leader is.
    replicas[lead].ctl().run(&["agent-credentials", "revoke", "--cluster", "evil", "--member", "m1"]).await?.ok()?;
    let refused = redirect_answer(&follower.addr(), &creds).await;
    let why = format!("{:#}", refused.err().context("a revoked certificate was redirected by a follower")?);
    assert!(why.contains("revoked"), "{why}");
    Ok(())
}

/// A TCP relay to one address that can be cut: the network between one replica and the state etcd.
struct Relay {
    port: u16,
    /// The accept loop and every relayed connection; aborting them drops (closes) their sockets.
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(target: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                t.lock().unwrap_or_else(|p| p.into_inner()).push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap_or_else(|p| p.into_inner()).push(accept.abort_handle());
        Ok(Self { port, tasks })
    }

    /// Cuts the relay: no new connection, the open ones dropped.
    fn cut(&self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
    }
}

#[tokio::test]
async fn a_replica_cut_off_from_the_state_etcd_stops_leading_and_ferryctl_works_through_any_replica(
) -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let state = EtcdCluster::start(3).await?;
    let target = state.member(0).client_url().trim_start_matches("http://").to_owned();
    let relay = Relay::start(target).await?;
    let ports = [free_port(), free_port()];
    let metrics = [free_port(), free_port()];
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let listen = |i: usize| format!("127.0.0.1:{}", metrics[i]);
    let (listen_a, listen_b) = (listen(0), listen(1));
    // The first replica reaches the state etcd only through the relay, and starts first: it leads.
    let cut_off = CoordinatorOptions {
        port: Some(ports[0]),
        ..replica_options(&format!("http://127.0.0.1:{}", relay.port), &addresses, &["--metrics-listen", &listen_a])
    };
    let a = Coordinator::start_s3(&s3, cut_off).await?;
    let b = Coordinator::start(CoordinatorOptions {
        port: Some(ports[1]),
        ..replica_options(&state.client_urls().join(","), &addresses, &["--metrics-listen", &listen_b])
    })
    .await?;
    assert_eq!(wait_new_leader(&state, None, TAKEOVER).await?, addresses[0]);
    // Both are ready (the follower takes connections and redirects them); only the leader answers /leaderz.
    let leading = |want: [u16; 2]| async move {
        poll_until("/leaderz to follow the election", TAKEOVER, Duration::from_millis(200), || async move {
            let codes = [http_get(metrics[0], "/leaderz")?.0, http_get(metrics[1], "/leaderz")?.0];
            Ok((codes == want).then_some(()))
        })
        .await
    };
    leading([200, 503]).await?;
    for (port, role) in [(metrics[0], "(leader)"), (metrics[1], "(follower")] {
        let (code, body) = http_get(port, "/readyz")?;
        assert!(code == 200 && body.contains(role), "/readyz on {port}: {code} {body}");
    }
    // ferryctl through either replica alone reaches the leader.
    for r in [&a, &b] {
        let only_this = r.dir().join("single.ferryconfig");
        let mut config: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(r.ferryconfig_path())?)?;
        config["coordinator"] = serde_yaml_ng::Value::from(r.addr());
        std::fs::write(&only_this, serde_yaml_ng::to_string(&config)?)?;
        std::fs::set_permissions(&only_this, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        crate::fixtures::ferry::Ferryctl::new(&only_this).run(&["get", "clusters"]).await?.ok()?;
    }

    relay.cut();
    let cut_at = Instant::now();
    poll_until("the cut-off replica to step down", TAKEOVER, Duration::from_millis(200), || async {
        let log = std::fs::read_to_string(a.log_path())?;
        Ok(log.contains("no longer the leader").then_some(()))
    })
    .await
    .with_context(|| log_tail(a.log_path(), 30))?;
    let stepped_down = cut_at.elapsed();
    assert_eq!(wait_new_leader(&state, Some(&addresses[0]), TAKEOVER).await?, addresses[1]);
    leading([503, 200]).await?;
    println!(
        "stepped down {:.1}s after the cut; new leader after {:.1}s",
        stepped_down.as_secs_f64(),
        cut_at.elapsed().as_secs_f64()
    );
    // The cut-off replica's own admin config still works: it lists the other replica too.
    a.ctl().run(&["get", "clusters"]).await?.ok()?;
    Ok(())
}
