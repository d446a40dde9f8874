//! An S3 endpoint served over HTTPS by a certificate from a private CA: the S3 config's `cacert` is what
//! makes it reachable, for the coordinator's validation and for the agents' uploads alike.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::fixtures::s3::S3Config;
use crate::fixtures::tls_proxy::TlsProxy;
use crate::fixtures::{
    assert_daemon_logs_clean, assert_same_kvs, expected_test_kvs, restore_and_read, Coordinator, CoordinatorOptions,
    EtcdCluster, S3Server, STATUS_OK, TEST_PREFIX,
};

const CLUSTER: &str = "prod";
const KEYS: usize = 500;
const BACKUP_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn s3_endpoint_with_a_private_ca_works_with_cacert_and_is_refused_without() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let proxy = TlsProxy::start(s3.port()).await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(KEYS).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::s3(&[])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let ctl = coordinator.ctl();

    // Without the CA the server's certificate is not trusted: the config is refused, and the message says
    // so and what to do ("… TLS certificate is not trusted …; … put that CA's PEM bundle in spec.cacert").
    let without_ca = S3Config { endpoint: proxy.endpoint(), ..s3.config() };
    let out = ctl.apply_yaml(&without_ca.to_yaml()).await?;
    assert!(!out.success(), "a config whose endpoint's CA is not trusted must be refused; stdout: {}", out.stdout);
    let stderr = out.stderr.trim();
    assert!(
        stderr.contains("certificate is not trusted") && stderr.contains("spec.cacert"),
        "the error should name the untrusted certificate and the fix: {stderr:?}"
    );

    // With the CA (a PEM block scalar, as pasted from a file) the same endpoint is accepted.
    let with_ca = S3Config { cacert: proxy.ca_pem().to_owned(), ..without_ca };
    ctl.apply_yaml(&with_ca.to_yaml()).await?.ok().context("apply the S3 config with cacert")?;
    let status: Value =
        ctl.get_json("etcdbackupoverallstatus", Some("etcdbackup-overall-status")).await?["spec"].clone();
    assert_eq!(status["configurationerror"], "", "usable with the CA: {status:#}");

    // The agent uploads through the proxy too, with the cacert it receives with the job.
    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_OK, "backup over HTTPS failed: {status:#}");

    let backups = coordinator.backups(CLUSTER).await?;
    anyhow::ensure!(backups.len() == 1, "exactly one backup of {CLUSTER} expected: {backups:#?}");
    let id = backups[0]["metadata"]["id"].as_str().context("backup metadata.id")?;
    let snapshot = coordinator.dir().join("tls.snapshot");
    coordinator.download_backup(CLUSTER, id, &snapshot, true).await?;
    let restored = restore_and_read(&snapshot).await?;
    let restored = restored.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
    assert_same_kvs(&expected_test_kvs(KEYS), &restored, "keys restored from the backup taken over HTTPS");

    assert!(s3.leftover_uploads().is_empty(), "unfinished uploads: {:?}", s3.leftover_uploads());
    // A refused config is an answer to the operator, not an ERROR in the coordinator's log.
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}
