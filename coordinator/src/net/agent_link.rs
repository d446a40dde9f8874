//! An agent's control stream: register the agent, take its periodic reports, have it renew its certificate
//! when the current one nears expiry (it sends a signing request, its key stays on the node), and mark it
//! gone when the link ends.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use ferry_common::backoff::Backoff;
use ferry_common::protocol::{
    expect_frame_within, read_frame_within, write_frame, AgentMsg, JobRequest, RenewAnswer, RenewCsr, RenewReply,
    RevokeTarget, MAX_AGENT_MESSAGE_FRAME,
};
use ferry_common::resources::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agents::{Agents, LiveAgent};
use crate::credentials::{Credentials, Refused};

/// How long an agent may take to make its key and send the signing request, and to save the certificate and
/// answer.
const RENEW_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before reading the certificate's record again after reading it failed.
const RECORD_RETRY: Duration = Duration::from_secs(60);
/// Retries of a failed renewal (the agent could not save it, the link hiccuped): from 1 s, doubling, at most
/// 60 s, and at most a 24th of the certificate's life (5 s for a 2-minute certificate, so that one is renewed
/// well within the third of its life left when renewal starts).
const RENEW_BACKOFF: Backoff = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(60), jitter: 0.2 };
const RENEW_BACKOFF_SHARE_OF_LIFE: u32 = 24;

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
            Some(AgentMsg::Report(mut facts)) => {
                // etcd keeps ten compaction hashes: a longer list is nobody's etcd, and is not kept.
                let extra = facts.hashed_compactions.len().saturating_sub(10);
                facts.hashed_compactions.drain(..extra);
                if let Some(e) = &facts.error {
                    warn!("agent cannot reach its etcd member: {e}");
                }
                agents.reported(cluster, member, conn_id, facts)?;
            }
        }
    }
}

/// Waits until the connection's certificate is due for renewal, then has the agent renew it; retries with
/// [`RENEW_BACKOFF`] until a renewed certificate is saved. Returns once one is (the connection keeps its
/// certificate; the agent reconnects with the new one) or when the certificate is revoked or renewed already.
async fn renew_when_due(credentials: &Credentials, serial: &str, conn: &quinn::Connection, cancel: &CancellationToken) {
    let mut failures: u32 = 0;
    let mut ca_changed = credentials.authority().subscribe();
    loop {
        let plan = match credentials.renewal_due(serial) {
            Ok(Some(plan)) => plan,
            Ok(None) => return,
            Err(e) => {
                warn!("failed to read the agent certificate's record: {e}");
                tokio::select! {
                    () = tokio::time::sleep(RECORD_RETRY) => continue,
                    () = cancel.cancelled() => return,
                }
            }
        };
        // During a CA rotation a certificate of the old CA is due at once.
        let on_signer =
            super::peer_certificate(conn).is_some_and(|der| credentials.authority().get().signed_by_signer(&der));
        let wait =
            if on_signer { plan.due.duration_since(SystemTime::now()).unwrap_or_default() } else { Duration::ZERO };
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => continue,
                changed = ca_changed.changed() => if changed.is_ok() { continue } else { return },
                () = cancel.cancelled() => return,
            }
        }
        match renew(credentials, serial, conn).await {
            Ok(()) => return,
            Err(e) => warn!("failed to renew the agent's certificate: {e:#}"),
        }
        failures = failures.saturating_add(1);
        let cap = (plan.lifetime / RENEW_BACKOFF_SHARE_OF_LIFE).max(RENEW_BACKOFF.base);
        let backoff = Backoff { max: RENEW_BACKOFF.max.min(cap), ..RENEW_BACKOFF };
        tokio::select! {
            () = tokio::time::sleep(backoff.delay(failures)) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// One renewal on its own stream: asks the agent for a signing request, signs its key as the successor of
/// `serial` (for this connection's identity only, whatever the request names) and sends the certificate.
/// When the agent says it could not save it, it is revoked; when the answer is lost it stays valid (the agent
/// may have saved it): it is revoked at the next renewal from `serial` if the agent comes back still
/// presenting `serial`, and its first use revokes `serial`.
async fn renew(credentials: &Credentials, serial: &str, conn: &quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await.context("open renewal stream")?;
    write_frame(&mut send, &JobRequest::RenewCredentials).await.context("send the renewal request")?;
    let csr: RenewCsr =
        tokio::time::timeout(RENEW_REPLY_TIMEOUT, expect_frame_within(&mut recv, MAX_AGENT_MESSAGE_FRAME))
            .await
            .context("no signing request within the timeout")?
            .context("read the signing request")?;
    let signed = match credentials.renew(serial, &csr.csr_pem) {
        Ok(signed) => signed,
        Err(e) => {
            let reason = match &e {
                Refused::Csr(_) | Refused::AlreadyRenewed(_) | Refused::Revoked(_) => e.to_string(),
                _ => "the coordinator could not sign it; the reason is in its log".to_string(),
            };
            let _ = write_frame(&mut send, &RenewAnswer::Refused { reason }).await;
            let _ = send.finish();
            return Err(e.into());
        }
    };
    let new = signed.serial.clone();
    let answer = RenewAnswer::Signed {
        cert_pem: signed.cert_pem,
        ca_pem: credentials.ca_pem(),
        serial: signed.serial,
        not_after: Timestamp::from(signed.not_after),
    };
    write_frame(&mut send, &answer).await.context("send the renewed certificate")?;
    let reply = tokio::time::timeout(
        RENEW_REPLY_TIMEOUT,
        expect_frame_within::<_, RenewReply>(&mut recv, MAX_AGENT_MESSAGE_FRAME),
    )
    .await
    .context("no answer within the timeout")?
    .context("read the answer")?;
    // The end of the exchange: the agent waits for it before it reconnects with the new certificate.
    let _ = send.finish();
    match reply {
        RenewReply::Saved => {
            if let Err(e) = credentials.mark_saved(&new) {
                warn!(serial = %new, "failed to record that the agent saved its renewed certificate: {e}");
            }
            info!(old = %serial, new = %new, "agent saved its renewed certificate");
            Ok(())
        }
        RenewReply::Failed { error } => {
            if let Err(r) = credentials.revoke(&RevokeTarget::Serial(new.clone())) {
                warn!(serial = %new, "failed to revoke the unsaved renewed certificate: {r}");
            }
            bail!("the agent could not save it: {error}")
        }
    }
}
