//! Stopping and removing things cleanly: SIGTERM lets an agent's running backup finish, and `delete` removes
//! what users own while refusing what Ferry writes itself.

use std::time::Duration;

use crate::fixtures::ferry::STATUS_OK;
use crate::fixtures::{Coordinator, CoordinatorOptions, EtcdCluster};

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
