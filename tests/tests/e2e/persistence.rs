//! The coordinator's state lives in its state dir: a crash (SIGKILL) and a restart on the same dir keep
//! the resources applied and the backups taken.

use std::time::Duration;

use anyhow::Context as _;

use crate::fixtures::{
    assert_no_unexpected_errors, assert_same_kvs, expected_test_kvs, manual_backup_yaml, restore_and_read, unix_now,
    Coordinator, CoordinatorOptions, EtcdCluster, Stop, STATUS_OK, TEST_PREFIX,
};

const CLUSTER: &str = "prod";
const KEYS: usize = 500;
const MANUAL_BACKUPS: &str = "EtcdManualBackups.ferry.dev";

#[tokio::test]
async fn manual_backup_and_backup_listing_survive_coordinator_kill() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(KEYS).await?;
    let mut coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let backup_at = unix_now();
    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, backup_at, 0)).await?.ok()?;
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(45)).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status}");
    let manual_before = coordinator.ctl().get_json(MANUAL_BACKUPS, Some(CLUSTER)).await?;
    let backups_before = coordinator.backups(CLUSTER).await?;
    assert_eq!(backups_before.len(), 1, "one backup before the crash: {backups_before:#?}");

    coordinator.restart(Stop::Kill).await?;

    let manual_after = coordinator.ctl().get_json(MANUAL_BACKUPS, Some(CLUSTER)).await?;
    assert_eq!(manual_after["spec"]["backupat"]["seconds"], backup_at, "manual backup after restart: {manual_after:#}");
    assert_eq!(manual_after, manual_before, "the manual backup resource changed across the restart");
    let backups_after = coordinator.backups(CLUSTER).await?;
    assert_eq!(backups_after, backups_before, "the backup listing changed across the restart");

    // And the backup itself is still there to download and restore.
    let id = backups_after[0]["metadata"]["id"].as_str().context("backup metadata.id")?;
    let snapshot = coordinator.dir().join("after-restart.snapshot");
    coordinator.download_backup(CLUSTER, id, &snapshot, true).await?;
    let restored: std::collections::HashMap<_, _> =
        restore_and_read(&snapshot).await?.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
    assert_same_kvs(&expected_test_kvs(KEYS), &restored, "keys restored from the backup after the restart");

    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}
