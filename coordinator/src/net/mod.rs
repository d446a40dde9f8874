//! The QUIC listener: mutual TLS handshake, protocol-version hello, then an admin request (to [`Api`]) or an
//! agent's control stream ([`agent_link`]). One tracing span per connection; every connection's token is a
//! child of the listener's, so connections close together, last, at shutdown.

mod agent_link;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::{
    expect_frame_within, read_frame_within, write_frame, AdminRequest, Hello, HelloReply, Intent,
    MAX_AGENT_MESSAGE_FRAME, MAX_FRAME, MAX_HELLO_FRAME, PROTOCOL_VERSION,
};
use ferry_common::tls::{certificate_serial, Identity};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::agents::Agents;
use crate::api::Api;
use crate::credentials::Credentials;
use crate::leader::Election;

/// A client must say hello this soon after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A request that streams no backup (get, apply, credentials…) must be answered within this, whatever the
/// client does; downloads and restores have their own deadline scaled by size and a progress timeout
/// (`api::backups`).
const REQUEST_DEADLINE: Duration = Duration::from_secs(600);
/// How long an admin client may take to read its response before the connection is dropped.
const ADMIN_LINGER: Duration = Duration::from_secs(30);
/// Connections one identity (the admin, or one agent's cluster/member) may hold open at once: an agent needs
/// one link plus a restore, ferryctl a few in parallel; a stolen certificate cannot open thousands.
pub const MAX_CONNECTIONS_PER_IDENTITY: usize = 16;

/// The listener and its connections.
pub struct Server {
    api: Arc<Api>,
    agents: Agents,
    credentials: Credentials,
    /// Parent of every connection's token: cancelled last at shutdown, closing them all.
    connections: CancellationToken,
    tracker: TaskTracker,
    /// Open connections per identity.
    caps: Caps,
    /// Set when shutdown begins: new connections are still answered, with a refusal that says why.
    shutting_down: CancellationToken,
}

impl Server {
    pub fn new(api: Arc<Api>, agents: Agents, credentials: Credentials) -> Arc<Self> {
        Arc::new(Self {
            api,
            agents,
            credentials,
            connections: CancellationToken::new(),
            tracker: TaskTracker::new(),
            caps: Caps::default(),
            shutting_down: CancellationToken::new(),
        })
    }

    /// Accepts connections until `stop_serving` fires (the end of shutdown, or of a term of leadership: the
    /// endpoint then belongs to whoever accepts next). Once `stop_accepting` fires, new connections are
    /// answered with a refusal that says the coordinator is shutting down (a bare transport refusal would
    /// leave ferryctl and agents guessing), while the open ones (agents' links, which running jobs use) stay.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        stop_accepting: CancellationToken,
        stop_serving: CancellationToken,
    ) {
        let shutting_down = self.shutting_down.clone();
        tokio::spawn(async move {
            stop_accepting.cancelled().await;
            shutting_down.cancel();
        });
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                () = stop_serving.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let server = self.clone();
            self.tracker.spawn(async move { server.connection(incoming).await });
        }
    }

    /// Shutdown, last step: closes every connection and waits up to `deadline` for their tasks.
    pub async fn close_connections(&self, deadline: Duration) {
        self.connections.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(deadline, self.tracker.wait()).await;
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                // Wrong CA, wrong ALPN, a scanner: the client's problem, not ours.
                Err(e) => return warn!(%remote, "refused a connection: TLS handshake failed: {e}"),
            };
            let Ok((identity, serial, _admitted, _slot)) = admit(&self.credentials, &self.caps, &conn, Role::Leader)
            else {
                return;
            };
            let span = match &identity {
                Identity::Admin => info_span!("admin", %remote),
                Identity::AdminReadOnly => info_span!("admin-ro", %remote),
                Identity::Agent { cluster, member } => info_span!("agent", %cluster, %member, %remote),
            };
            async move {
                if let Err(e) = self.handle(conn, identity, &serial).await {
                    info!("connection ended: {e:#}");
                }
            }
            .instrument(span)
            .await
        }
    }
}

/// While this replica does not lead (several replicas on one state etcd): accepts connections until `stop`
/// fires and tells every client which replica leads ([`HelloReply::NotLeader`]); ferryctl and agents dial it.
/// A follower admits exactly whom the leader would (recorded, unrevoked certificates, the per-identity cap):
/// a revoked certificate learns nothing from it, and one certificate cannot hold thousands of its connections.
pub async fn redirect_to_leader(
    endpoint: quinn::Endpoint,
    election: Election,
    credentials: Credentials,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let caps = Caps::default();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = stop.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let (election, credentials, caps) = (election.clone(), credentials.clone(), caps.clone());
        tracker.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return warn!(%remote, "refused a connection: TLS handshake failed: {e}"),
                Err(_) => return,
            };
            let Ok((_identity, _serial, _admitted, _slot)) = admit(&credentials, &caps, &conn, Role::Follower) else {
                return;
            };
            if let Err(e) = say_not_leader(&conn, &election).await {
                debug!(%remote, "redirect to the leader failed: {e:#}");
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(HELLO_TIMEOUT, tracker.wait()).await;
}

async fn say_not_leader(conn: &quinn::Connection, election: &Election) -> Result<()> {
    let (mut send, _recv, _hello) = accept_hello(conn).await?;
    let leader = election.leader().await;
    debug!(?leader, "not the leader: redirecting");
    final_reply(conn, &mut send, &HelloReply::NotLeader { leader }).await.context("send redirect")?;
    Ok(())
}

/// The first stream of a connection and the hello on it, each within [`HELLO_TIMEOUT`].
async fn accept_hello(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream, Hello)> {
    let (send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .context("no stream within the hello timeout")?
        .context("accept first stream")?;
    let hello: Hello = tokio::time::timeout(HELLO_TIMEOUT, expect_frame_within(&mut recv, MAX_HELLO_FRAME))
        .await
        .context("no hello within the timeout")?
        .context("read hello")?;
    Ok((send, recv, hello))
}

/// A hello reply that ends the conversation (a refusal, a redirect): sent, then a short wait for the client
/// to read it and close, so closing our side does not cut it off.
async fn final_reply(conn: &quinn::Connection, send: &mut quinn::SendStream, reply: &HelloReply) -> Result<()> {
    write_frame(send, reply).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// Open connections per identity, capped at [`MAX_CONNECTIONS_PER_IDENTITY`]; cheap to clone.
#[derive(Clone, Default)]
struct Caps(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// One open connection counted against its identity's cap; released on drop.
struct ConnectionSlot {
    caps: Caps,
    key: String,
}

impl Caps {
    fn take(&self, key: &str) -> Option<ConnectionSlot> {
        let mut open = crate::lock(&self.0);
        let n = open.entry(key.to_string()).or_default();
        if *n >= MAX_CONNECTIONS_PER_IDENTITY {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { caps: self.clone(), key: key.to_string() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = crate::lock(&self.caps.0);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Who may hold a connection at all, on the leader and on every follower alike: a client certificate with a
/// Ferry identity, recorded and not revoked, within its identity's connection cap. `Err` closes `conn` with
/// the reason (and logs it).
fn admit(
    credentials: &Credentials,
    caps: &Caps,
    conn: &quinn::Connection,
    role: Role,
) -> std::result::Result<(Identity, String, Option<crate::credentials::OpenConnection>, ConnectionSlot), ()> {
    let remote = conn.remote_address();
    let (identity, serial) = match peer_identity(conn) {
        Ok(i) => i,
        Err(e) => {
            warn!(%remote, "refused a connection: {e:#}");
            conn.close(1u32.into(), b"no ferry identity in certificate");
            return Err(());
        }
    };
    let key = identity_key(&identity);
    // Certificates must be recorded and not revoked; registered first so a revocation closes it.
    let admitted = match credentials.admit(&serial, &identity, conn) {
        Ok(open) => Some(open),
        // A follower cut off from the state etcd cannot look the certificate up. It only names the leader,
        // which admits for real; refusing would leave clients of a partitioned replica with nowhere to go.
        Err(crate::credentials::Refused::State(e)) if role == Role::Follower => {
            debug!(%remote, identity = %key, "redirecting without a certificate check (state store unreachable: {e})");
            None
        }
        Err(e) => {
            warn!(%remote, identity = %key, "refused a connection: {e}");
            conn.close(3u32.into(), e.to_string().as_bytes());
            return Err(());
        }
    };
    let Some(slot) = caps.take(&key) else {
        warn!(%remote, identity = %key, "refused a connection: {MAX_CONNECTIONS_PER_IDENTITY} already open for this identity");
        conn.close(2u32.into(), b"too many connections for this identity");
        return Err(());
    };
    Ok((identity, serial, admitted, slot))
}

/// Where [`admit`] runs: the leader serves, a follower only redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

/// The key an identity's connections are counted under.
fn identity_key(identity: &Identity) -> String {
    match identity {
        Identity::Admin => "admin".to_string(),
        Identity::AdminReadOnly => "admin-ro".to_string(),
        Identity::Agent { cluster, member } => format!("agent/{cluster}/{member}"),
    }
}

/// The peer's own certificate (DER), if it presented one.
fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.to_vec())
}

/// The peer's identity and its certificate's serial (hex).
fn peer_identity(conn: &quinn::Connection) -> Result<(Identity, String)> {
    let any = conn.peer_identity().ok_or_else(|| anyhow!("no client certificate"))?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().ok_or_else(|| anyhow!("empty client certificate chain"))?;
    Ok((Identity::from_certificate(leaf)?, certificate_serial(leaf)?))
}

impl Server {
    async fn handle(&self, conn: quinn::Connection, identity: Identity, serial: &str) -> Result<()> {
        let (mut send, mut recv, hello) = accept_hello(&conn).await?;
        let refusal = if self.shutting_down.is_cancelled() {
            Some(
                "the coordinator is shutting down and takes no new requests or links; retry once it is back"
                    .to_string(),
            )
        } else if hello.protocol_version != PROTOCOL_VERSION {
            Some(format!(
                "protocol version {} is not supported by this coordinator (version {}, protocol {PROTOCOL_VERSION}); run matching Ferry versions",
                hello.protocol_version,
                env!("CARGO_PKG_VERSION")
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            final_reply(&conn, &mut send, &HelloReply::Refused { reason: reason.clone() }).await?;
            bail!("refused: {reason}");
        }
        let reply =
            HelloReply::Ok { protocol_version: PROTOCOL_VERSION, software_version: env!("CARGO_PKG_VERSION").into() };
        write_frame(&mut send, &reply).await.context("send hello reply")?;

        match (&identity, hello.intent) {
            (_, Intent::Request) => {
                // A request must arrive as promptly as the hello: an open connection that says nothing is dropped.
                // An agent's (only `Restore`) is small; an admin's `apply` may be large.
                let max = if matches!(identity, Identity::Agent { .. }) { MAX_AGENT_MESSAGE_FRAME } else { MAX_FRAME };
                let Some(request): Option<AdminRequest> =
                    tokio::time::timeout(HELLO_TIMEOUT, read_frame_within(&mut recv, max))
                        .await
                        .context("no request within the timeout")?
                        .context("read request")?
                else {
                    // A hello and a clean end: `ferryctl version` asking only for the versions.
                    debug!("hello only (a version check)");
                    return Ok(());
                };
                debug!(?request, "request");
                let streams = matches!(request, AdminRequest::Download { .. } | AdminRequest::Restore { .. });
                // Boxed: a request's future is large, and without the box every connection's task (10 000 agent
                // links) would be sized for it (docs/PERFORMANCE.md, "Scale").
                let answer = Box::pin(self.api.handle(&identity, request, &mut send));
                if streams {
                    answer.await?;
                } else {
                    tokio::time::timeout(REQUEST_DEADLINE, answer)
                        .await
                        .context("the request was not answered within its deadline; dropping the connection")??;
                }
                send.finish().ok();
                // Let the client read everything; it closes the connection when done.
                tokio::select! {
                    _ = tokio::time::timeout(ADMIN_LINGER, conn.closed()) => {}
                    () = self.connections.cancelled() => {}
                }
                Ok(())
            }
            (Identity::Admin | Identity::AdminReadOnly, Intent::AgentLink) => {
                bail!("an admin certificate cannot act as an agent")
            }
            (Identity::Agent { cluster, member }, Intent::AgentLink) => {
                let cancel = self.connections.child_token();
                let peer = agent_link::Peer { cluster, member, serial, software_version: hello.software_version };
                Box::pin(agent_link::run(&self.agents, &self.credentials, peer, &conn, &mut recv, &cancel)).await
            }
        }
    }
}
