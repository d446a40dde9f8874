//! Addresses: an agent and ferryctl reach a coordinator that listens on the IPv6 loopback only.

use std::time::Duration;

use crate::fixtures::{Coordinator, CoordinatorOptions, EtcdCluster, STATUS_OK};

const CLUSTER: &str = "six";

#[tokio::test]
async fn an_agent_backs_up_through_a_coordinator_listening_on_ipv6_loopback() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let coordinator = Coordinator::start(CoordinatorOptions { ipv6: true, ..Default::default() }).await?;
    assert!(coordinator.addr().starts_with("[::1]:"), "{}", coordinator.addr());
    // An agent socket bound to 0.0.0.0 cannot send to [::1]: it would never connect.
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status}");
    assert_eq!(coordinator.backups(CLUSTER).await?.len(), 1);
    Ok(())
}
