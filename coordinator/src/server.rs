//! The QUIC listener: mutual TLS handshake, protocol-version hello, then an admin request or an agent's
//! control stream. One tracing span per connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::{
    expect_frame, read_frame, write_frame, AdminRequest, AgentMsg, Hello, HelloReply, Intent, PROTOCOL_VERSION,
};
use ferry_common::resources::Timestamp;
use ferry_common::tls::Identity;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::coordinator::{Coordinator, LiveAgent};

/// A client must say hello this soon after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an admin client may take to read its response before the connection is dropped.
const ADMIN_LINGER: Duration = Duration::from_secs(30);

/// Accepts connections until the coordinator is cancelled.
pub async fn serve(coord: Arc<Coordinator>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = coord.cancel.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let c = coord.clone();
        coord.tasks.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                // Wrong CA, wrong ALPN, a scanner: the client's problem, not ours.
                Err(e) => return warn!(%remote, "refused a connection: TLS handshake failed: {e}"),
            };
            let identity = match peer_identity(&conn) {
                Ok(i) => i,
                Err(e) => {
                    warn!(%remote, "refused a connection: {e:#}");
                    return conn.close(1u32.into(), b"no ferry identity in certificate");
                }
            };
            let span = match &identity {
                Identity::Admin => info_span!("admin", %remote),
                Identity::Agent { cluster, member } => info_span!("agent", %cluster, %member, %remote),
            };
            async move {
                if let Err(e) = handle(c, conn, identity).await {
                    info!("connection ended: {e:#}");
                }
            }
            .instrument(span)
            .await
        });
    }
}

fn peer_identity(conn: &quinn::Connection) -> Result<Identity> {
    let any = conn.peer_identity().ok_or_else(|| anyhow!("no client certificate"))?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().ok_or_else(|| anyhow!("empty client certificate chain"))?;
    Ok(Identity::from_certificate(leaf)?)
}

async fn handle(coord: Arc<Coordinator>, conn: quinn::Connection, identity: Identity) -> Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .context("no stream within the hello timeout")?
        .context("accept first stream")?;
    let hello: Hello = tokio::time::timeout(HELLO_TIMEOUT, expect_frame(&mut recv))
        .await
        .context("no hello within the timeout")?
        .context("read hello")?;
    if hello.protocol_version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {} is not supported by this coordinator (version {}, protocol {PROTOCOL_VERSION}); run matching Ferry versions",
            hello.protocol_version,
            env!("CARGO_PKG_VERSION")
        );
        write_frame(&mut send, &HelloReply::Refused { reason: reason.clone() }).await?;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        bail!("refused: {reason}");
    }
    let reply =
        HelloReply::Ok { protocol_version: PROTOCOL_VERSION, software_version: env!("CARGO_PKG_VERSION").into() };
    write_frame(&mut send, &reply).await.context("send hello reply")?;

    match (&identity, hello.intent) {
        (_, Intent::Request) => {
            let request: AdminRequest = expect_frame(&mut recv).await.context("read request")?;
            debug!(?request, "request");
            crate::api::handle(&coord, &identity, request, &mut send).await?;
            send.finish().ok();
            // Let the client read everything; it closes the connection when done.
            let _ = tokio::time::timeout(ADMIN_LINGER, conn.closed()).await;
            Ok(())
        }
        (Identity::Admin, Intent::AgentLink) => bail!("an admin certificate cannot act as an agent"),
        (Identity::Agent { cluster, member }, Intent::AgentLink) => {
            let conn_id = coord.next_conn_id();
            let now = Timestamp::now();
            let live = LiveAgent {
                member: member.clone(),
                conn: conn.clone(),
                conn_id,
                facts: None,
                software_version: hello.software_version,
                address: conn.remote_address(),
                connected_since: now,
                last_heard: now,
            };
            coord.agent_connected(cluster, live)?;
            info!("agent connected");
            let result = agent_loop(&coord, cluster, member, conn_id, &mut recv).await;
            coord.agent_disconnected(cluster, member, conn_id)?;
            info!("agent disconnected");
            result
        }
    }
}

async fn agent_loop(
    coord: &Coordinator,
    cluster: &str,
    member: &str,
    conn_id: u64,
    recv: &mut quinn::RecvStream,
) -> Result<()> {
    loop {
        let msg = tokio::select! {
            m = read_frame::<_, AgentMsg>(recv) => m.context("read agent report")?,
            _ = coord.cancel.cancelled() => return Ok(()),
        };
        match msg {
            None => return Ok(()),
            Some(AgentMsg::Report(facts)) => {
                if let Some(e) = &facts.error {
                    warn!("agent cannot reach its etcd member: {e}");
                }
                coord.agent_reported(cluster, member, conn_id, facts)?;
            }
        }
    }
}
