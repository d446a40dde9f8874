//! A backup that fails leaves nothing behind: no listed backup, no partial object, and a status that says why.

use std::time::Duration;

use crate::fixtures::ferry::STATUS_ERROR;
use crate::fixtures::{Coordinator, CoordinatorOptions, EtcdCluster};

const CLUSTER: &str = "broken";

/// Files under the local store, hidden partial files included.
fn store_files(coordinator: &Coordinator) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(coordinator.store_dir()) else { return out };
    for d in dirs.flatten() {
        if let Ok(files) = std::fs::read_dir(d.path()) {
            out.extend(files.flatten().map(|f| f.path().display().to_string()));
        }
    }
    out
}

#[tokio::test]
async fn failed_backup_leaves_nothing_listed_and_says_why() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(200).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    // The agent is connected and its last report was healthy, but its member is gone: the job starts (a
    // backup id is reserved and a partial file created) and then fails on the agent.
    etcd.stop_member(0).await?;
    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_ERROR, "the backup should fail: {status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("etcd"), "the error should name etcd: {error:?}");

    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "a failed backup must not be listed");
    assert!(
        coordinator.ctl().list_json("etcdbackup", None).await?.is_empty(),
        "a failed backup must not be listed without a selector either"
    );
    let files = store_files(&coordinator);
    assert!(files.is_empty(), "the failed backup left files in the store: {files:?}");
    Ok(())
}
