//! An agent's control stream: register the agent, take its periodic reports, and mark it gone when the link
//! ends.

use anyhow::{Context, Result};
use ferry_common::protocol::{read_frame, AgentMsg};
use ferry_common::resources::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agents::{Agents, LiveAgent};

/// Runs the link until the agent goes or `cancel` fires.
pub(super) async fn run(
    agents: &Agents,
    cluster: &str,
    member: &str,
    software_version: String,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    cancel: &CancellationToken,
) -> Result<()> {
    let conn_id = agents.next_conn_id();
    let now = Timestamp::now();
    let live = LiveAgent {
        member: member.to_string(),
        conn: conn.clone(),
        conn_id,
        facts: None,
        software_version,
        address: conn.remote_address(),
        connected_since: now,
        last_heard: now,
    };
    agents.connected(cluster, live)?;
    info!("agent connected");
    let result = reports(agents, cluster, member, conn_id, recv, cancel).await;
    agents.disconnected(cluster, member, conn_id)?;
    info!("agent disconnected");
    if cancel.is_cancelled() {
        conn.close(0u32.into(), b"coordinator shutting down");
    }
    result
}

async fn reports(
    agents: &Agents,
    cluster: &str,
    member: &str,
    conn_id: u64,
    recv: &mut quinn::RecvStream,
    cancel: &CancellationToken,
) -> Result<()> {
    loop {
        let msg = tokio::select! {
            m = read_frame::<_, AgentMsg>(recv) => m.context("read agent report")?,
            () = cancel.cancelled() => return Ok(()),
        };
        match msg {
            None => return Ok(()),
            Some(AgentMsg::Report(facts)) => {
                if let Some(e) = &facts.error {
                    warn!("agent cannot reach its etcd member: {e}");
                }
                agents.reported(cluster, member, conn_id, facts)?;
            }
        }
    }
}
