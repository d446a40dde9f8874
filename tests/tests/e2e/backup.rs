//! Manual backups end to end: a real etcd cluster, a coordinator with a local store and one agent per
//! member; the backup must restore, with `etcdctl`, to exactly the keys that were written.

use std::time::Duration;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use crate::fixtures::{
    assert_daemon_logs_clean, assert_same_kvs, expected_test_kvs, restore_and_read, unix_now, Coordinator,
    CoordinatorOptions, EtcdCluster, STATUS_OK, TEST_PREFIX,
};

const CLUSTER: &str = "prod";
const KEYS: usize = 3000;
const BACKUP_TIMEOUT: Duration = Duration::from_secs(45);

#[tokio::test]
async fn manual_backup_of_three_member_cluster_restores_every_key() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    let written_at_revision = etcd.put_keys(KEYS).await?;
    let expected = expected_test_kvs(KEYS);
    assert_same_kvs(&expected, &etcd.read_prefix(TEST_PREFIX).await?, "keys written to etcd");

    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let requested_at = unix_now();
    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status}");

    // Listed under the cluster's label, and only there.
    let backups = coordinator.backups(CLUSTER).await?;
    assert_eq!(backups.len(), 1, "exactly one backup of {CLUSTER}: {backups:#?}");
    let other = coordinator.backups("some-other-cluster").await?;
    assert!(other.is_empty(), "the selector must filter by cluster: {other:#?}");
    let backup = &backups[0];
    let id = backup["metadata"]["id"].as_str().context("backup metadata.id")?;
    assert_eq!(backup["metadata"]["labels"]["ferry.dev/cluster"], CLUSTER, "cluster label: {backup:#}");
    let spec = &backup["spec"];
    let member = spec["member"].as_str().context("backup spec.member")?;
    assert!(["m1", "m2", "m3"].contains(&member), "backup taken from a member of the cluster: {spec:#}");
    let revision = spec["revision"].as_i64().context("backup spec.revision")?;
    assert!(
        revision >= written_at_revision,
        "backup revision {revision} < revision {written_at_revision} of the writes"
    );
    let created = spec["createdat"]["seconds"].as_i64().context("backup spec.createdat.seconds")?;
    assert!(
        (requested_at - 5..=unix_now() + 5).contains(&created),
        "createdat {created} not between the request ({requested_at}) and now"
    );

    // Downloaded both ways: the compressed object, and the plain snapshot.
    let snapshot = coordinator.dir().join("download.snapshot");
    let compressed = coordinator.dir().join("download.snapshot.zst");
    coordinator.download_backup(CLUSTER, id, &snapshot, true).await?;
    coordinator.download_backup(CLUSTER, id, &compressed, false).await?;
    let snapshot_bytes = std::fs::read(&snapshot)?;
    let compressed_bytes = std::fs::read(&compressed)?;
    assert_eq!(spec["rawsize"].as_u64(), Some(snapshot_bytes.len() as u64), "spec.rawsize is the snapshot's size");
    assert_eq!(spec["size"].as_u64(), Some(compressed_bytes.len() as u64), "spec.size is the stored object's size");
    let sha256 = spec["sha256"].as_str().context("backup spec.sha256")?;
    assert_eq!(sha256, hex::encode(Sha256::digest(&compressed_bytes)), "spec.sha256 is the stored object's digest");
    let raw_sha256 = spec["rawsha256"].as_str().context("backup spec.rawsha256")?;
    assert_eq!(raw_sha256, hex::encode(Sha256::digest(&snapshot_bytes)), "spec.rawsha256 is the snapshot's digest");

    // The stored object is plain zstd: the `zstd` tool decompresses it to the same snapshot.
    let unzstd = coordinator.dir().join("unzstd.snapshot");
    let output = tokio::process::Command::new("zstd")
        .arg("-d")
        .arg("-q")
        .arg(&compressed)
        .arg("-o")
        .arg(&unzstd)
        .output()
        .await
        .context("run zstd -d")?;
    assert!(output.status.success(), "zstd -d failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(std::fs::read(&unzstd)? == snapshot_bytes, "zstd -d of the object differs from --decompress");

    // The snapshot restores with etcdctl to every key that was written, and nothing the cluster lacks.
    let restored = restore_and_read(&snapshot).await?;
    let restored_test_keys =
        restored.iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_same_kvs(&expected, &restored_test_keys, "keys restored from the backup");
    assert_same_kvs(&etcd.read_prefix("").await?, &restored, "whole keyspace: live cluster vs restored backup");

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}
