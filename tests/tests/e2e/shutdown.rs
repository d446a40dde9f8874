//! Stopping and removing things cleanly: SIGTERM lets an agent's running backup finish; SIGTERM to the
//! coordinator starts no backup during its grace period and cancels one that runs past it, leaving nothing
//! behind; `delete` removes what users own while refusing what Ferry writes itself.

use std::time::{Duration, Instant};

use crate::fixtures::ferry::{STATUS_ERROR, STATUS_OK};
use crate::fixtures::{manual_backup_yaml, unix_now, Coordinator, CoordinatorOptions, EtcdCluster, Stop};

const CLUSTER: &str = "graceful";

#[tokio::test]
async fn sigterm_lets_the_agents_running_backup_finish() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    // ~6 MiB of incompressible data at 16 Mbit/s: a backup of about three seconds.
    etcd.put_random_values(6 << 20, 7).await?;
    let coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: vec!["--upload-limit-mbps".into(), "16".into()],
        ..Default::default()
    })
    .await?;
    let mut agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    coordinator.manual_backup(CLUSTER).await?;
    coordinator.wait_backup_running(CLUSTER, Duration::from_secs(30)).await?;

    let exited_on_its_own = agents[0].stop().await;
    assert!(exited_on_its_own, "the agent should exit by itself once its backup is done");
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(30)).await?;
    assert_eq!(status["status"], STATUS_OK, "the backup running at SIGTERM completes: {status}");
    let log = std::fs::read_to_string(agents[0].log_path())?;
    assert!(log.contains("waiting for running backups"), "the agent should say it drains:\n{log}");
    assert_eq!(coordinator.backups(CLUSTER).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn delete_removes_a_resource_and_refuses_ferry_owned_types() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let ctl = coordinator.ctl();
    ctl.apply_yaml("metadata:\n  namespace: default\n  type: Clusters.ferry.dev\n  id: gone\nspec: {}\n")
        .await?
        .ok()?;
    ctl.get_json("cluster", Some("gone")).await?;

    let out = ctl.run(&["delete", "cluster", "gone"]).await?.ok()?;
    assert!(out.stdout.contains("Clusters.ferry.dev/gone deleted"), "{}", out.stdout);
    let out = ctl.run(&["get", "cluster", "gone"]).await?;
    assert!(!out.success() && out.stderr.contains("not found"), "a deleted cluster is gone: {}", out.stderr);

    let out = ctl.run(&["delete", "cluster", "gone"]).await?;
    assert!(!out.success() && out.stderr.contains("not found"), "{}", out.stderr);
    let out = ctl.run(&["delete", "etcdbackupstatus", "x"]).await?;
    assert!(!out.success() && out.stderr.contains("written by Ferry itself"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn coordinator_sigterm_starts_no_backup_in_the_grace_and_cancels_one_running_past_it() -> anyhow::Result<()> {
    const SLOW: &str = "slow";
    const QUEUED: &str = "queued";
    const GRACE_S: u64 = 3;
    let slow_etcd = EtcdCluster::start(1).await?;
    // ~16 MiB of incompressible data at 16 Mbit/s: a backup of about eight seconds, well past the grace.
    slow_etcd.put_random_values(16 << 20, 11).await?;
    let queued_etcd = EtcdCluster::start(1).await?;
    queued_etcd.put_keys(20).await?;
    let grace = format!("{GRACE_S}s");
    let mut coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: ["--upload-limit-mbps", "16", "--max-concurrent-backups", "1", "--shutdown-grace", &grace]
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
        ..Default::default()
    })
    .await?;
    let _slow_agents = coordinator.start_agents(SLOW, &slow_etcd).await?;
    let _queued_agents = coordinator.start_agents(QUEUED, &queued_etcd).await?;
    coordinator.manual_backup(SLOW).await?;
    coordinator.wait_backup_running(SLOW, Duration::from_secs(30)).await?;
    // One job slot, taken: this one queues.
    coordinator.manual_backup(QUEUED).await?;

    let ctl = coordinator.ctl().with_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let stopping = coordinator.stop();
    let during_grace = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ctl.apply_yaml(&manual_backup_yaml(QUEUED, unix_now(), 0)).await
    };
    let (exited_on_its_own, refused) = tokio::join!(stopping, during_grace);
    let refused = refused?;
    assert!(exited_on_its_own, "the coordinator exits by itself after the grace period and the cancel");
    assert!(started.elapsed() >= Duration::from_secs(GRACE_S), "it waited for the grace period");
    assert!(!refused.success(), "no manual backup is taken in during shutdown: {refused:?}");
    assert_eq!(refused.status.code(), Some(2), "a coordinator that is going away is a server failure: {refused:?}");
    assert!(refused.stderr.contains("shutting down"), "ferryctl is told why, not a transport error: {refused:?}");

    let log = std::fs::read_to_string(coordinator.log_path())?;
    assert!(log.contains("the queued backup does not start"), "the queued job gave up:\n{log}");
    assert!(log.contains("cancelling them"), "the running job was cancelled:\n{log}");
    let leftovers: Vec<_> = crate::fixtures::files_under(&coordinator.store_dir())?;
    assert!(leftovers.is_empty(), "a cancelled backup leaves no file, partial or whole: {leftovers:?}");

    coordinator.restart(Stop::Kill).await?;
    let slow = coordinator.backup_status(SLOW).await?;
    assert_eq!(slow["status"], STATUS_ERROR, "the cancelled backup is an error: {slow}");
    assert!(slow["error"].as_str().is_some_and(|e| e.contains("shutting down")), "{slow}");
    let queued = coordinator.backup_status(QUEUED).await?;
    assert!(queued["lastbackupattempt"].is_null(), "the queued backup never started: {queued}");
    assert!(coordinator.backups(SLOW).await?.is_empty());
    assert!(coordinator.backups(QUEUED).await?.is_empty());
    Ok(())
}
