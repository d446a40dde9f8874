//! Self-tests of the harness: when these fail, suspect the fixtures (or the etcd install), not the
//! daemons.

use anyhow::Context as _;

use crate::fixtures::tools::etcd_tool;

use crate::fixtures::{
    assert_same_kvs, expected_test_kvs, restore_and_read, Coordinator, CoordinatorOptions, EtcdCluster, TEST_PREFIX,
};

#[tokio::test]
async fn etcdctl_snapshot_of_three_member_cluster_restores_every_key() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(1000).await?;
    let expected = expected_test_kvs(1000);
    assert_same_kvs(&expected, &etcd.read_prefix(TEST_PREFIX).await?, "keys written");

    // A cluster that lost one member of three keeps serving.
    etcd.stop_member(2).await?;
    assert_same_kvs(&expected, &etcd.read_prefix(TEST_PREFIX).await?, "keys read with m3 stopped");

    let snapshot = etcd.dir().join("etcdctl.snapshot");
    let output = tokio::process::Command::new(etcd_tool("etcdctl")?)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", etcd.member(0).client_url(), "snapshot", "save"])
        .arg(&snapshot)
        .output()
        .await
        .context("run etcdctl snapshot save")?;
    assert!(output.status.success(), "etcdctl snapshot save: {}", String::from_utf8_lossy(&output.stderr));

    let restored = restore_and_read(&snapshot).await?;
    assert_same_kvs(&expected, &restored, "keys restored from an etcdctl snapshot");
    Ok(())
}

#[tokio::test]
async fn a_daemon_that_exits_at_startup_fails_fast_with_its_log() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let options = CoordinatorOptions { extra_args: vec!["--no-such-flag".to_owned()], ..CoordinatorOptions::default() };
    let err = Coordinator::start(options).await.expect_err("a coordinator given an unknown flag must not come up");
    let message = format!("{err:#}");
    assert!(message.contains("exited"), "the error says the daemon exited: {message}");
    assert!(message.contains("no-such-flag"), "the error shows the daemon's log: {message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
    Ok(())
}
