//! Agents are authenticated by the coordinator's own CA: credentials issued by another coordinator must
//! not get an agent in, whether or not the agent trusts the coordinator.

use std::time::Duration;

use crate::fixtures::{Agent, Coordinator, CoordinatorOptions, EtcdCluster};

/// How long the foreign agents get to try; several of their reconnect attempts fit in it.
const WATCH: Duration = Duration::from_secs(8);

#[tokio::test]
async fn agent_with_credentials_from_another_ca_never_connects() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let other = Coordinator::start(CoordinatorOptions::default()).await?;
    let etcd_url = etcd.member(0).client_url();

    // Everything from the other coordinator: this agent does not even trust our server certificate.
    let foreign = other.issue_agent_credentials("foreign", "m1").await?;
    let _foreign_agent = Agent::start(&coordinator, &foreign, etcd_url)?;

    // Our CA certificate (public, so an attacker has it) with a client certificate from the other CA:
    // the agent trusts us, so it is our coordinator that has to refuse the client certificate.
    let own = coordinator.issue_agent_credentials("good", "m1").await?;
    let forged = other.issue_agent_credentials("forged", "m1").await?;
    std::fs::copy(own.join("ca.crt"), forged.join("ca.crt"))?;
    let _forged_agent = Agent::start(&coordinator, &forged, etcd_url)?;

    let deadline = tokio::time::Instant::now() + WATCH;
    while tokio::time::Instant::now() < deadline {
        let agents = coordinator.ctl().list_json("agents", None).await?;
        for cluster in ["foreign", "forged"] {
            let found: Vec<_> = agents.iter().filter(|a| a["spec"]["cluster"] == cluster).collect();
            assert!(
                !found.iter().any(|a| a["spec"]["connected"] == true),
                "an agent with a certificate from another CA ({cluster}) shows as connected: {found:#?}"
            );
            assert!(found.is_empty(), "an untrusted certificate ({cluster}) created an agent resource: {found:#?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Control: an agent with this coordinator's own credentials does connect, so the others were kept out
    // by their certificates and not by anything else.
    let _agent = Agent::start(&coordinator, &own, etcd_url)?;
    coordinator.wait_agents_connected("good", &["m1"], Duration::from_secs(30)).await?;
    for cluster in ["foreign", "forged"] {
        assert!(coordinator.connected_agents(cluster).await?.is_empty(), "{cluster} agent connected late");
    }
    Ok(())
}
