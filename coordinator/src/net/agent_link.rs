//! An agent's control stream: register the agent, take its periodic reports, send it a renewed certificate
//! when its current one nears expiry, and mark it gone when the link ends.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use ferry_common::protocol::{
    expect_frame, read_frame_within, write_frame, AgentMsg, JobRequest, RenewReply, RenewedCredentials,
    MAX_AGENT_MESSAGE_FRAME,
};
use ferry_common::resources::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agents::{Agents, LiveAgent};
use crate::credentials::Credentials;

/// How long an agent may take to save a renewed certificate and answer.
const RENEW_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before sending a renewal again after one failed (the agent could not save it, or the link hiccuped).
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// Who is on the other end of a link.
pub(super) struct Peer<'a> {
    pub cluster: &'a str,
    pub member: &'a str,
    /// The serial of the certificate this connection was made with.
    pub serial: &'a str,
    pub software_version: String,
}

/// Runs the link until the agent goes or `cancel` fires.
pub(super) async fn run(
    agents: &Agents,
    credentials: &Credentials,
    peer: Peer<'_>,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    cancel: &CancellationToken,
) -> Result<()> {
    let Peer { cluster, member, serial, software_version } = peer;
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
    // The renewal runs beside the reports and never ends the link, whether it succeeds or gives up.
    let renewal = async {
        renew_when_due(credentials, serial, conn, cancel).await;
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        r = reports(agents, cluster, member, conn_id, recv, cancel) => r,
        () = renewal => Ok(()),
    };
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
            m = read_frame_within::<_, AgentMsg>(recv, MAX_AGENT_MESSAGE_FRAME) => m.context("read agent report")?,
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

/// Waits until the connection's certificate is due for renewal, then sends the agent its successor; retries
/// every [`RENEW_RETRY`] until one is saved. Returns once one is (the connection keeps its certificate; the
/// next one uses the new) or when the certificate is revoked (a revoked certificate is never renewed).
async fn renew_when_due(credentials: &Credentials, serial: &str, conn: &quinn::Connection, cancel: &CancellationToken) {
    loop {
        let wait = match credentials.renewal_due(serial) {
            Ok(Some(due)) => due.duration_since(SystemTime::now()).unwrap_or_default(),
            Ok(None) => return,
            Err(e) => {
                warn!("failed to read the agent certificate's record: {e}");
                RENEW_RETRY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
        if credentials.renewal_due(serial).ok().flatten().is_some_and(|due| due <= SystemTime::now()) {
            match renew(credentials, serial, conn).await {
                Ok(()) => return,
                Err(e) => warn!("failed to renew the agent's certificate: {e:#}"),
            }
            tokio::select! {
                () = tokio::time::sleep(RENEW_RETRY) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// Issues the successor of `serial` and sends it. When the agent says it could not save it, it is revoked;
/// when the answer is lost it stays valid (the agent may have saved it), and the next renewal from `serial`
/// revokes it if the agent comes back still presenting `serial`.
async fn renew(credentials: &Credentials, serial: &str, conn: &quinn::Connection) -> Result<()> {
    let issued = credentials.renew(serial)?;
    let new = issued.serial.clone();
    let sent = async {
        let (mut send, mut recv) = conn.open_bi().await.context("open renewal stream")?;
        let renewed = RenewedCredentials {
            ca_pem: credentials.ca_pem(),
            cert_pem: issued.pem.cert_pem,
            key_pem: issued.pem.key_pem,
            serial: issued.serial,
            not_after: Timestamp::from(issued.not_after),
        };
        write_frame(&mut send, &JobRequest::RenewCredentials(Box::new(renewed))).await.context("send")?;
        let _ = send.finish();
        tokio::time::timeout(RENEW_REPLY_TIMEOUT, expect_frame::<_, RenewReply>(&mut recv))
            .await
            .context("no answer within the timeout")?
            .context("read the answer")
    }
    .await?;
    match sent {
        RenewReply::Saved => {
            info!(old = %serial, new = %new, "agent saved its renewed certificate");
            Ok(())
        }
        RenewReply::Failed { error } => {
            if let Err(r) = credentials.revoke(&ferry_common::protocol::RevokeTarget::Serial(new.clone())) {
                warn!(serial = %new, "failed to revoke the unsaved renewed certificate: {r}");
            }
            bail!("the agent could not save it: {error}")
        }
    }
}
