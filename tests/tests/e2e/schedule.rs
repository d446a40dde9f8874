//! Automatic backups end to end: a cluster's `spec.backupconfiguration` (set with `apply` or a cluster
//! template) makes the coordinator back it up on its own — the first backup at once, then one per interval
//! after the newest backup, across coordinator restarts — from a follower, failing over to another member
//! when the chosen agent dies, keeping only what the retention policy says, and spreading many clusters on
//! the same interval apart with jitter.
//!
//! The tests lower the coordinator's bounds (`--min-backup-interval`) to seconds so that several intervals
//! fit in a test.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::fixtures::ferry::CtlOutput;
use crate::fixtures::logs::log_tail;
use crate::fixtures::{
    assert_daemon_logs_clean, assert_no_unexpected_errors, assert_same_kvs, manual_backup_yaml, poll_until,
    restore_and_read_raw, unix_now, Agent, Coordinator, CoordinatorOptions, EtcdCluster, Stop, STATUS_OK, TEST_PREFIX,
};

const CLUSTER: &str = "prod";
const MIB: usize = 1024 * 1024;
/// How often the tests look at the backup listing while waiting for the scheduler.
const POLL: Duration = Duration::from_millis(500);
/// The scheduler wakes once a second, and a job takes a moment to reach its agent: how late a due backup
/// may start.
const SCHEDULER_SLACK: f64 = 2.0;

/// Coordinator options with `args` as extra flags.
fn options(args: &[&str]) -> CoordinatorOptions {
    CoordinatorOptions { extra_args: args.iter().map(|a| (*a).to_owned()).collect(), ..CoordinatorOptions::default() }
}

/// Now, in seconds since the Unix epoch, with the fraction.
fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A `spec.backupconfiguration` asking for a backup every `seconds`, keeping the newest `keeplast` when given.
fn every(seconds: i64, keeplast: Option<u32>) -> Value {
    let mut config = json!({ "interval": { "seconds": seconds, "nanos": 0 }, "schedule": "" });
    if let Some(keeplast) = keeplast {
        config["retention"] = json!({ "keeplast": keeplast, "hourly": 0, "daily": 0, "weekly": 0 });
    }
    config
}

/// A `Clusters.ferry.dev` document for `cluster` with a backup every `seconds`, for clusters written without
/// reading them first (applied ahead of their agents, or many at once).
fn cluster_yaml(cluster: &str, seconds: i64) -> String {
    format!(
        "metadata:\n  namespace: default\n  type: Clusters.ferry.dev\n  id: {cluster}\n  labels:\n    \
         ferry.dev/cluster: {cluster}\nspec:\n  backupconfiguration:\n    interval:\n      seconds: {seconds}\n      \
         nanos: 0\n"
    )
}

/// Sets a registered cluster's backup configuration the way a user does: `get cluster NAME -o json`, edit
/// `spec.backupconfiguration`, `apply -f -` (JSON is YAML). The caller decides whether it had to succeed.
pub(crate) async fn set_backup_configuration(
    coordinator: &Coordinator,
    cluster: &str,
    config: Value,
) -> anyhow::Result<CtlOutput> {
    let mut resource = coordinator.ctl().get_json("cluster", Some(cluster)).await?;
    resource["spec"]["backupconfiguration"] = config;
    coordinator.ctl().apply_yaml(&serde_json::to_string_pretty(&resource)?).await
}

/// One listed backup, with the times the scheduler works from.
#[derive(Debug, Clone)]
struct Taken {
    id: String,
    cluster: String,
    member: String,
    /// When the agent began reading the snapshot.
    started: f64,
    /// When it finished (`spec.createdat`): the next backup is due one interval after this.
    created: f64,
}

/// A `{seconds, nanos}` timestamp in seconds.
fn timestamp(value: &Value) -> anyhow::Result<f64> {
    let seconds = value["seconds"].as_i64().with_context(|| format!("timestamp without seconds: {value}"))?;
    let nanos = value["nanos"].as_i64().unwrap_or(0);
    Ok(seconds as f64 + nanos as f64 / 1e9)
}

impl Taken {
    fn from_resource(backup: &Value) -> anyhow::Result<Self> {
        let spec = &backup["spec"];
        Ok(Self {
            id: backup["metadata"]["id"].as_str().context("backup metadata.id")?.to_owned(),
            cluster: spec["cluster"].as_str().context("backup spec.cluster")?.to_owned(),
            member: spec["member"].as_str().context("backup spec.member")?.to_owned(),
            started: timestamp(&spec["startedat"]).context("backup spec.startedat")?,
            created: timestamp(&spec["createdat"]).context("backup spec.createdat")?,
        })
    }
}

/// The backups of `cluster`, oldest first.
async fn taken(coordinator: &Coordinator, cluster: &str) -> anyhow::Result<Vec<Taken>> {
    let mut out: Vec<Taken> =
        coordinator.backups(cluster).await?.iter().map(Taken::from_resource).collect::<anyhow::Result<_>>()?;
    out.reverse();
    Ok(out)
}

/// Waits until `cluster` has at least `count` backups; returns them, oldest first.
async fn wait_backups(
    coordinator: &Coordinator,
    cluster: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Taken>> {
    poll_until(&format!("{count} backup(s) of {cluster}"), timeout, POLL, || async {
        let backups = taken(coordinator, cluster).await?;
        if backups.len() >= count {
            Ok(Some(backups))
        } else {
            anyhow::bail!("{} so far: {backups:?}", backups.len())
        }
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(coordinator.log_path(), 30)))
}

/// Asserts `ferryctl` failed with one `error: ...` line on stderr containing every one of `needles`.
#[track_caller]
fn assert_refused_naming(out: &CtlOutput, needles: &[&str]) {
    assert!(!out.success(), "`{}` should have failed; stdout: {}", out.command, out.stdout);
    let stderr = out.stderr.trim();
    assert!(stderr.starts_with("error:"), "`{}`: stderr should start with `error:`: {stderr:?}", out.command);
    assert_eq!(stderr.lines().count(), 1, "`{}`: a one-line error expected: {stderr:?}", out.command);
    for needle in needles {
        assert!(stderr.contains(needle), "`{}`: the error should name {needle:?}: {stderr:?}", out.command);
    }
}

#[tokio::test]
async fn first_backup_comes_at_once_then_one_per_interval() -> anyhow::Result<()> {
    const INTERVAL: f64 = 4.0;
    // The default jitter: 5 % of the interval.
    const JITTER: f64 = INTERVAL * 0.05;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(options(&["--min-backup-interval", "2s"])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    // A registered cluster has automatic backups off until it is configured.
    let cluster = coordinator.ctl().get_json("cluster", Some(CLUSTER)).await?;
    assert_eq!(cluster["spec"]["backupconfiguration"], Value::Null, "off by default: {cluster:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(taken(&coordinator, CLUSTER).await?.is_empty(), "no backup before automatic backups are configured");

    let enabled_at = now_f64();
    set_backup_configuration(&coordinator, CLUSTER, every(INTERVAL as i64, None)).await?.ok()?;
    let backups = wait_backups(&coordinator, CLUSTER, 4, Duration::from_secs(40)).await?;

    let first = &backups[0];
    assert!(
        first.started - enabled_at <= SCHEDULER_SLACK + 1.0,
        "the first backup of a cluster without backups is due at once; it started {:.1}s after enabling",
        first.started - enabled_at
    );
    for pair in backups.windows(2) {
        let gap = pair[1].started - pair[0].created;
        assert!(
            (INTERVAL - JITTER - 0.1..=INTERVAL + JITTER + SCHEDULER_SLACK).contains(&gap),
            "backup {} started {gap:.2}s after {} finished; expected the {INTERVAL}s interval ± {JITTER}s jitter \
             (+{SCHEDULER_SLACK}s scheduling slack): {backups:#?}",
            pair[1].id,
            pair[0].id
        );
    }

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn coordinator_restart_adds_no_backup_and_catches_up_a_missed_one() -> anyhow::Result<()> {
    const INTERVAL: f64 = 20.0;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    // No jitter: the due time is exactly one interval after the newest backup.
    let mut coordinator =
        Coordinator::start(options(&["--min-backup-interval", "10s", "--backup-jitter-percent", "0"])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    set_backup_configuration(&coordinator, CLUSTER, every(INTERVAL as i64, None)).await?.ok()?;
    let first = wait_backups(&coordinator, CLUSTER, 1, Duration::from_secs(15)).await?.remove(0);
    let due = first.created + INTERVAL;

    // A crash and a restart right after a backup: the next one is still due an interval after it. The
    // status shows any attempt, even one that found no agent (after a crash, agents notice the new
    // coordinator only when QUIC's idle timeout ends their old link).
    let attempt_before = coordinator.backup_status(CLUSTER).await?["lastbackupattempt"].clone();
    coordinator.restart(Stop::Kill).await?;
    let watch_until = due - 8.0;
    anyhow::ensure!(now_f64() < watch_until - 5.0, "the restart took too long to leave a window to watch");
    while now_f64() < watch_until {
        let backups = taken(&coordinator, CLUSTER).await?;
        let ids: Vec<&str> = backups.iter().map(|b| b.id.as_str()).collect();
        let left = due - now_f64();
        assert_eq!(ids, [first.id.as_str()], "a coordinator restart added a backup {left:.1}s before it was due");
        let status = coordinator.backup_status(CLUSTER).await?;
        assert_eq!(
            status["lastbackupattempt"], attempt_before,
            "a coordinator restart started a backup {left:.1}s before it was due: {status:#}"
        );
        tokio::time::sleep(POLL).await;
    }

    // Down across the due time: that backup is missed, and taken as soon as the coordinator is back.
    coordinator.kill();
    while now_f64() < due + 3.0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back_at = now_f64();
    coordinator.restart(Stop::Kill).await?;
    let backups = wait_backups(&coordinator, CLUSTER, 2, Duration::from_secs(20)).await.with_context(|| {
        format!("the backup missed while the coordinator was down; agent log:\n{}", log_tail(agents[0].log_path(), 20))
    })?;
    assert_eq!(backups.len(), 2, "exactly one catch-up backup: {backups:#?}");
    let caught_up = &backups[1];
    assert!(caught_up.started >= due, "the catch-up backup started before it was due: {caught_up:?}");
    assert!(
        caught_up.started - back_at <= 15.0,
        "the missed backup started {:.1}s after the coordinator was restarted",
        caught_up.started - back_at
    );
    let status = coordinator.backup_status(CLUSTER).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn out_of_bounds_interval_is_rejected_naming_the_bounds() -> anyhow::Result<()> {
    let coordinator =
        Coordinator::start(options(&["--min-backup-interval", "2s", "--max-backup-interval", "1h"])).await?;
    let ctl = coordinator.ctl();
    let needles = ["out of bounds", "2s", "1h", "--min-backup-interval", "--max-backup-interval"];

    for (what, seconds) in [("1s, below the minimum", 1), ("2h, above the maximum", 7200)] {
        let out = ctl.apply_yaml(&cluster_yaml(CLUSTER, seconds)).await?;
        assert_refused_naming(&out, &needles);
        let stored = ctl.run(&["get", "cluster", CLUSTER, "-o", "json"]).await?;
        assert!(!stored.success(), "an interval of {what} must not be stored: {}", stored.stdout);
    }

    // A cluster template is held to the same bounds.
    let template = coordinator.dir().join("too-often.yaml");
    std::fs::write(&template, "kind: Cluster\nname: prod\nfeatures:\n  backupConfiguration:\n    interval: 1s\n")?;
    let template = template.display().to_string();
    let out = ctl.run(&["cluster", "template", "-f", &template, "sync"]).await?;
    assert_refused_naming(&out, &needles);
    let stored = ctl.run(&["get", "cluster", CLUSTER, "-o", "json"]).await?;
    assert!(!stored.success(), "a template with an out-of-bounds interval must not be stored: {}", stored.stdout);

    // Within the bounds, the same document goes through.
    ctl.apply_yaml(&cluster_yaml(CLUSTER, 3600)).await?.ok()?;
    let cluster = ctl.get_json("cluster", Some(CLUSTER)).await?;
    assert_eq!(cluster["spec"]["backupconfiguration"]["interval"]["seconds"], 3600, "{cluster:#}");

    // A change log's window is held to 1h..400d, on apply (even with the log off) and in a template.
    let with_window = |enabled: bool, seconds: i64| {
        format!(
            "{}    pointintime:\n      enabled: {enabled}\n      window: {{seconds: {seconds}, nanos: 0}}\n",
            cluster_yaml(CLUSTER, 3600)
        )
    };
    for (enabled, seconds, why) in [(true, 1800, "30m is shorter than 1h"), (false, 401 * 86_400, "401d is longer")] {
        let out = ctl.apply_yaml(&with_window(enabled, seconds)).await?;
        assert_refused_naming(&out, &["spec.backupconfiguration.pointintime.window", why, "between 1h and 400d"]);
    }
    std::fs::write(
        &template,
        "kind: Cluster\nname: prod\nfeatures:\n  backupConfiguration:\n    interval: 1h\n    pointInTime: {enabled: true, window: 30m}\n",
    )?;
    let out = ctl.run(&["cluster", "template", "-f", &template, "sync"]).await?;
    assert_refused_naming(&out, &["pointInTime.window \"30m\"", "shorter than 1h", "7d"]);
    ctl.apply_yaml(&with_window(true, 2 * 86_400)).await?.ok()?;
    let cluster = ctl.get_json("cluster", Some(CLUSTER)).await?;
    let pit = &cluster["spec"]["backupconfiguration"]["pointintime"];
    assert_eq!(*pit, json!({ "enabled": true, "window": { "seconds": 172_800, "nanos": 0 } }), "{cluster:#}");

    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn template_diff_shows_the_change_sync_applies_it_and_second_diff_is_empty() -> anyhow::Result<()> {
    const TEMPLATE: &str = "\
kind: Cluster
name: prod
kubernetes:
  version: v1.31.0
talos:
  version: v1.8.0
features:
  backupConfiguration:
    interval: 10s
    retention:
      keepLast: 3
    pointInTime: {enabled: false, window: 2d}
---
kind: ControlPlane
machines: [cp1, cp2, cp3]
---
kind: Workers
machines: [w1]
";
    const HEADER: &str = "--- Clusters.ferry.dev(default/prod)\n+++ Clusters.ferry.dev(default/prod)\n";
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(options(&["--min-backup-interval", "2s"])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let ctl = coordinator.ctl();
    let path = coordinator.dir().join("cluster-template.yaml");
    std::fs::write(&path, TEMPLATE)?;
    let path = path.display().to_string();
    let before = ctl.get_json("cluster", Some(CLUSTER)).await?;

    let diff = ctl.run(&["cluster", "template", "-f", &path, "diff"]).await?.ok()?;
    assert!(diff.stdout.starts_with(HEADER), "a unified diff headed by the cluster resource: {}", diff.stdout);
    let changed = |sign: char, text: &str| diff.stdout.lines().any(|l| l.starts_with(sign) && l[1..].trim() == text);
    assert!(changed('-', "backupconfiguration: null"), "the diff removes the empty configuration: {}", diff.stdout);
    for added in ["seconds: 10", "keeplast: 3", "seconds: 172800"] {
        assert!(changed('+', added), "the diff adds `{added}`: {}", diff.stdout);
    }
    // What Ferry does not manage is accepted, with a notice naming it.
    let notices: Vec<&str> = diff.stderr.lines().filter(|l| l.starts_with("notice:")).collect();
    for ignored in ["ControlPlane", "Workers", "kubernetes", "talos"] {
        assert!(notices.iter().any(|n| n.contains(ignored)), "no notice about {ignored}: {:?}", diff.stderr);
    }
    assert_eq!(ctl.get_json("cluster", Some(CLUSTER)).await?, before, "`diff` must change nothing");

    let sync = ctl.run(&["cluster", "template", "-f", &path, "sync"]).await?.ok()?;
    assert!(sync.stdout.contains("Clusters.ferry.dev/prod updated"), "sync output: {}", sync.stdout);
    let after = ctl.get_json("cluster", Some(CLUSTER)).await?;
    let config = &after["spec"]["backupconfiguration"];
    assert_eq!(config["interval"], json!({ "seconds": 10, "nanos": 0 }), "{after:#}");
    assert_eq!(config["retention"]["keeplast"], 3, "{after:#}");
    assert_eq!(config["pointintime"], json!({ "enabled": false, "window": { "seconds": 172_800, "nanos": 0 } }));
    assert_eq!(after["metadata"]["labels"]["ferry.dev/cluster"], CLUSTER, "sync keeps the labels: {after:#}");

    let second = ctl.run(&["cluster", "template", "-f", &path, "diff"]).await?.ok()?;
    assert_eq!(second.stdout, "", "nothing left to change after sync");
    let resync = ctl.run(&["cluster", "template", "-f", &path, "sync"]).await?.ok()?;
    assert!(resync.stdout.contains("in sync"), "a second sync changes nothing: {}", resync.stdout);

    // The synced configuration acts: the cluster had no backup, so the first comes at once.
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(15)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn follower_is_chosen_over_the_leader() -> anyhow::Result<()> {
    const BACKUPS: usize = 4;
    let etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    // The leader as etcd says it, and as the agents report it to the coordinator.
    let leader_id = etcd_leader(&etcd).await?;
    let leader = poll_until("the agents to report the leader", Duration::from_secs(30), POLL, || async {
        let connected = coordinator.connected_agents(CLUSTER).await?;
        let leaders: Vec<&Value> = connected.iter().filter(|a| a["spec"]["leader"] == true).collect();
        match leaders.as_slice() {
            [one] if one["spec"]["memberid"] == leader_id.as_str() => {
                Ok(Some(one["spec"]["member"].as_str().context("agent spec.member")?.to_owned()))
            }
            _ => anyhow::bail!("etcd's leader is {leader_id}; agents say {connected:#?}"),
        }
    })
    .await?;

    let mut previous: Option<Value> = None;
    let mut requested_at = 0;
    for _ in 0..BACKUPS {
        // A manual backup is keyed by its second.
        while unix_now() <= requested_at {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        requested_at = unix_now();
        coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, requested_at, 0)).await?.ok()?;
        let status = match &previous {
            None => coordinator.wait_backup_status(CLUSTER, Duration::from_secs(30)).await?,
            Some(p) => coordinator.wait_next_backup_status(CLUSTER, p, Duration::from_secs(30)).await?,
        };
        assert_eq!(status["status"], STATUS_OK, "{status:#}");
        let newest = Taken::from_resource(coordinator.backups(CLUSTER).await?.first().context("no backup listed")?)?;
        assert_eq!(status["member"], newest.member.as_str(), "the status names the member of the latest backup");
        previous = Some(status);
    }

    let members: Vec<String> = taken(&coordinator, CLUSTER).await?.into_iter().map(|b| b.member).collect();
    assert_eq!(members.len(), BACKUPS, "{members:?}");
    assert!(!members.contains(&leader), "no backup from the leader {leader} while followers are fine: {members:?}");
    let distinct: BTreeSet<&String> = members.iter().collect();
    assert!(distinct.len() >= 2, "the followers take turns: {members:?}");
    assert_eq!(etcd_leader(&etcd).await?, leader_id, "the leader changed during the test; it proves nothing");

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

/// The member id (hex, as agents report it) of the leader, asked of etcd itself.
async fn etcd_leader(etcd: &EtcdCluster) -> anyhow::Result<String> {
    let mut client = etcd.client().await?;
    let status = tokio::time::timeout(Duration::from_secs(10), client.status())
        .await
        .context("etcd status: timed out")?
        .map_err(|e| anyhow::anyhow!("etcd status: {e:?}"))?;
    anyhow::ensure!(status.leader() != 0, "etcd has no leader");
    Ok(format!("{:x}", status.leader()))
}

#[tokio::test]
async fn killed_agent_mid_backup_another_member_completes_it() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    let written = etcd.put_random_values(6 * MIB, 11).await?;
    // 8 Mbit/s is 1 MB/s: about 6 s per attempt, time to kill the agent in the middle.
    let coordinator = Coordinator::start(options(&["--upload-limit-mbps", "8"])).await?;
    let mut agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    coordinator.manual_backup(CLUSTER).await?;
    let running = coordinator.wait_backup_running(CLUSTER, Duration::from_secs(30)).await?;
    let victim = running["member"].as_str().context("status spec.member")?.to_owned();
    let index = etcd.members().iter().position(|m| m.name() == victim).with_context(|| {
        format!("the running backup's member {victim:?} is not a member of the cluster: {running:#}")
    })?;
    agents[index].kill();

    // The coordinator notices the dead agent (at the latest when QUIC's idle timeout ends the link) and
    // moves on to another member at once: the status stays running and ends well.
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(75)).await?;
    assert_eq!(status["status"], STATUS_OK, "another member should complete the backup: {status:#}");
    let member = status["member"].as_str().context("status spec.member")?.to_owned();
    assert_ne!(member, victim, "the status names the member that completed the backup: {status:#}");

    let backups = taken(&coordinator, CLUSTER).await?;
    assert_eq!(backups.len(), 1, "one backup, from the second member: {backups:#?}");
    assert_eq!(backups[0].member, member, "{backups:#?}");
    let snapshot = coordinator.dir().join("failover.snapshot");
    coordinator.download_backup(CLUSTER, &backups[0].id, &snapshot, true).await?;
    let restored: HashMap<String, Vec<u8>> =
        restore_and_read_raw(&snapshot).await?.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
    assert_same_kvs(&written, &restored, "random values restored from the failed-over backup");

    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    for (i, agent) in agents.iter().enumerate() {
        if i != index {
            assert_no_unexpected_errors(agent.log_path(), &[]);
        }
    }
    Ok(())
}

#[tokio::test]
async fn retention_keeps_exactly_keeplast() -> anyhow::Result<()> {
    const KEEP: usize = 2;
    const BACKUPS: usize = 4;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    // Hourly, keeping 2: the first backup comes at once; the others are manual, which retention counts too.
    set_backup_configuration(&coordinator, CLUSTER, every(3600, Some(KEEP as u32))).await?.ok()?;
    let mut status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(15)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    let first = coordinator.backups(CLUSTER).await?;
    let mut ids = vec![Taken::from_resource(first.first().context("no backup listed")?)?.id];
    let mut requested_at = unix_now();
    while ids.len() < BACKUPS {
        while unix_now() <= requested_at {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        requested_at = unix_now();
        coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, requested_at, 0)).await?.ok()?;
        status = coordinator.wait_next_backup_status(CLUSTER, &status, Duration::from_secs(30)).await?;
        assert_eq!(status["status"], STATUS_OK, "{status:#}");
        // Retention ran before the status turned OK.
        let listed = taken(&coordinator, CLUSTER).await?;
        assert!(listed.len() <= KEEP, "more than keeplast={KEEP} backups listed: {listed:#?}");
        ids.push(listed.last().context("no backup listed")?.id.clone());
    }
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), BACKUPS, "each backup got its own id: {ids:?}");

    let (deleted, kept) = ids.split_at(BACKUPS - KEEP);
    let listed: Vec<String> = taken(&coordinator, CLUSTER).await?.into_iter().map(|b| b.id).collect();
    assert_eq!(listed, kept, "exactly the {KEEP} newest are listed");

    // In the store: the manifests and objects of the kept ones, nothing of the others.
    let dir = coordinator.store_dir().join(CLUSTER);
    let mut files: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    files.sort();
    let mut expected: Vec<String> =
        kept.iter().flat_map(|id| [format!("{id}.manifest.json"), format!("{id}.snapshot.zst")]).collect();
    expected.sort();
    assert_eq!(files, expected, "{} holds only the kept backups", dir.display());

    let log = std::fs::read_to_string(coordinator.log_path())?;
    for id in deleted {
        assert!(
            log.lines().any(|l| l.contains("retention deleted backup") && l.contains(id.as_str())),
            "the deletion of {id} is logged"
        );
    }
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn twenty_clusters_on_one_interval_do_not_start_in_the_same_second() -> anyhow::Result<()> {
    const CLUSTERS: usize = 20;
    const INTERVAL: f64 = 20.0;
    // 20 % of 20 s, below the 5 s cap.
    const JITTER: f64 = 4.0;
    // Several clusters may queue for the 8 job slots.
    const QUEUE_SLACK: f64 = 5.0;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let coordinator = Coordinator::start(options(&[
        "--min-backup-interval",
        "10s",
        "--backup-jitter-percent",
        "20",
        "--max-backup-jitter",
        "5s",
    ]))
    .await?;
    let names: Vec<String> = (1..=CLUSTERS).map(|i| format!("c{i:02}")).collect();

    // One small etcd stands in for 20 clusters: each agent holds credentials for another cluster name.
    let mut agents: Vec<Agent> = Vec::new();
    for name in &names {
        let creds = coordinator.issue_agent_credentials(name, "m1").await?;
        agents.push(Agent::start_with_env(&coordinator, &creds, etcd.member(0).client_url(), &[("RUST_LOG", "warn")])?);
    }
    poll_until("every agent to connect", Duration::from_secs(60), POLL, || async {
        let agents = coordinator.ctl().list_json("agents", None).await?;
        let connected = agents.iter().filter(|a| a["spec"]["connected"] == true).count();
        Ok((connected == CLUSTERS).then_some(()))
    })
    .await?;

    // The same interval for all, in one apply: the first backups are due together.
    let documents: Vec<String> = names.iter().map(|n| cluster_yaml(n, INTERVAL as i64)).collect();
    let applied_at = now_f64();
    coordinator.ctl().apply_yaml(&documents.join("---\n")).await?.ok()?;

    let by_cluster =
        poll_until("two backups of every cluster", Duration::from_secs(75), Duration::from_secs(1), || async {
            let mut by_cluster: HashMap<String, Vec<Taken>> = HashMap::new();
            for backup in coordinator.ctl().list_json("etcdbackup", None).await? {
                let backup = Taken::from_resource(&backup)?;
                by_cluster.entry(backup.cluster.clone()).or_default().push(backup);
            }
            let done = names.iter().filter(|n| by_cluster.get(*n).is_some_and(|b| b.len() >= 2)).count();
            if done == CLUSTERS {
                Ok(Some(by_cluster))
            } else {
                anyhow::bail!("{done} of {CLUSTERS} clusters have two backups")
            }
        })
        .await
        .with_context(|| format!("coordinator log:\n{}", log_tail(coordinator.log_path(), 30)))?;

    let mut second_round_seconds = BTreeSet::new();
    for name in &names {
        let mut backups = by_cluster[name].clone();
        backups.sort_by(|a, b| a.created.total_cmp(&b.created));
        let (first, second) = (&backups[0], &backups[1]);
        assert!(
            first.started - applied_at <= SCHEDULER_SLACK + QUEUE_SLACK,
            "{name}: the first backup is due at once; it started {:.1}s after the apply",
            first.started - applied_at
        );
        let gap = second.started - first.created;
        assert!(
            (INTERVAL - JITTER - 0.1..=INTERVAL + JITTER + SCHEDULER_SLACK + QUEUE_SLACK).contains(&gap),
            "{name}: the second backup started {gap:.1}s after the first finished; expected {INTERVAL}s ± {JITTER}s"
        );
        second_round_seconds.insert(second.started.floor() as i64);
    }
    assert!(
        second_round_seconds.len() >= 5,
        "jitter should spread the second round over several seconds; it started in {second_round_seconds:?}"
    );

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

/// Manifests dated in the future (written by an older version from a skewed agent's clock, or planted) sort
/// before every real backup; retention must still keep the newest backup the coordinator itself verified,
/// and that backup must restore.
#[tokio::test]
async fn retention_never_deletes_the_newest_verified_backup_whatever_other_manifests_are_dated() -> anyhow::Result<()> {
    const KEEP: u32 = 2;
    /// 2100-01-01: far ahead of any backup taken now.
    const FUTURE: i64 = 4_102_444_800;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    set_backup_configuration(&coordinator, CLUSTER, every(3600, Some(KEEP))).await?.ok()?;
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(30)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    let first = taken(&coordinator, CLUSTER).await?.pop().context("no backup listed")?.id;

    // Two copies of the first backup, each a well-formed manifest beside its object, dated in 2100.
    let dir = coordinator.store_dir().join(CLUSTER);
    let manifest = std::fs::read_to_string(dir.join(format!("{first}.manifest.json")))?;
    let future: Vec<String> = (1..=KEEP).map(|i| format!("{first}-future{i}")).collect();
    for id in &future {
        let mut m: Value = serde_json::from_str(&manifest.replace(first.as_str(), id))?;
        m["backup"]["createdat"] = json!({ "seconds": FUTURE, "nanos": 0 });
        std::fs::write(dir.join(format!("{id}.manifest.json")), serde_json::to_vec(&m)?)?;
        std::fs::copy(dir.join(format!("{first}.snapshot.zst")), dir.join(format!("{id}.snapshot.zst")))?;
    }
    let listed: Vec<String> = taken(&coordinator, CLUSTER).await?.into_iter().map(|b| b.id).collect();
    assert_eq!(listed.len(), 1 + future.len(), "the dated copies are listed: {listed:?}");

    // By date alone, keeplast 2 would keep the two copies and delete the backup just taken.
    etcd.put_keys(150).await?;
    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
    let status = coordinator.wait_next_backup_status(CLUSTER, &status, Duration::from_secs(30)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    let after: Vec<String> = taken(&coordinator, CLUSTER).await?.into_iter().map(|b| b.id).collect();
    let newest = after.iter().find(|id| **id != first && !future.contains(id)).context("the new backup is gone")?;
    assert!(dir.join(format!("{newest}.snapshot.zst")).is_file(), "its object is in the store");
    assert!(!after.contains(&first), "the older real backup went by the policy: {after:?}");

    let snapshot = coordinator.dir().join("newest.snapshot");
    coordinator.download_backup(CLUSTER, newest, &snapshot, true).await?;
    let restored = restore_and_read_raw(&snapshot).await?;
    let keys = restored.keys().filter(|k| k.starts_with(TEST_PREFIX)).count();
    assert_eq!(keys, 150, "the kept backup restores with every key written before it");
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}
