//! The client side of one request to the coordinator (ferryctl, `ferry-agent restore`): dial with mutual
//! TLS, say hello, send one [`AdminRequest`], read the answers.
//!
//! The coordinator may be several replicas (`ADDR,ADDR,…`): the client tries them in order and follows a
//! replica that does not lead to the one that does, waiting out an election ([`FAILOVER_WAIT`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::protocol::{expect_frame, write_frame, AdminRequest, FrameError, Hello, HelloReply, Intent};
use crate::tls::{quinn_client_config, resolve, CertifiedPem};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Per replica when there are several: a dead one should not hold up the others for long.
const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client waits for a leader while replicas answer that there is none (an election: a dead
/// leader's lease runs out within 5 s).
pub const FAILOVER_WAIT: Duration = Duration::from_secs(20);
/// Redirects followed in a row before giving up (replicas disagreeing about who leads, for a moment).
const MAX_REDIRECTS: usize = 3;

/// The request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot connect to the coordinator at {addr}: {reason}; check that it runs and that these credentials belong to it")]
    Connect { addr: String, reason: String },
    #[error("no answer from the coordinator at {0} within 10s; check that it runs and that UDP to it is allowed")]
    Timeout(String),
    #[error("the coordinator refused the connection: {0}")]
    Refused(String),
    #[error("no coordinator replica leads right now (tried {0}); an election may be under way, try again shortly")]
    NoLeader(String),
    #[error("talking to the coordinator: {0}")]
    Frame(#[from] FrameError),
}

/// The local address a client socket binds to reach `peer`: any port on the unspecified address of the same
/// family, so an IPv6-only coordinator (e.g. `[::1]`) is reachable as well as an IPv4 one.
pub fn bind_address_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// What the coordinator said about itself in its hello reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    pub protocol_version: u32,
    pub software_version: String,
}

/// An open request to the coordinator.
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    pub recv: quinn::RecvStream,
    /// The coordinator's versions, from the hello exchange.
    pub server: ServerHello,
}

impl Session {
    /// Dials `coordinator` (`host:port`), says hello and sends `request`.
    pub async fn open(
        coordinator: &str,
        ca_pem: &str,
        client: &CertifiedPem,
        request: &AdminRequest,
    ) -> Result<Self, ClientError> {
        let (endpoint, conn, mut send, recv, server) = connect(coordinator, ca_pem, client).await?;
        write_frame(&mut send, request).await?;
        let _ = send.finish();
        Ok(Self { endpoint, conn, recv, server })
    }

    /// Dials `coordinator`, says hello and hangs up: the coordinator's versions (`ferryctl version`).
    pub async fn hello(coordinator: &str, ca_pem: &str, client: &CertifiedPem) -> Result<ServerHello, ClientError> {
        let (endpoint, conn, mut send, recv, server) = connect(coordinator, ca_pem, client).await?;
        let _ = send.finish();
        Self { endpoint, conn, recv, server: server.clone() }.close().await;
        Ok(server)
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

type Connected = (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream, ServerHello);

/// The replica addresses of a `--coordinator`/ferryconfig value: `ADDR[,ADDR…]`.
pub fn coordinator_addresses(coordinator: &str) -> Vec<String> {
    coordinator.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect()
}

/// What one replica answered.
enum Dialed {
    Connected(Connected),
    NotLeader(Option<String>),
}

/// Dials the coordinator (one address or several replicas) and exchanges hellos with the leader.
async fn connect(coordinator: &str, ca_pem: &str, client: &CertifiedPem) -> Result<Connected, ClientError> {
    let addresses = coordinator_addresses(coordinator);
    if addresses.is_empty() {
        return Err(ClientError::Setup("no coordinator address given".into()));
    }
    let timeout = if addresses.len() > 1 { REPLICA_CONNECT_TIMEOUT } else { CONNECT_TIMEOUT };
    let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
    let mut last_error = None;
    loop {
        let mut saw_follower = false;
        for first in &addresses {
            let mut addr = first.clone();
            for _ in 0..=MAX_REDIRECTS {
                match connect_one(&addr, ca_pem, client, timeout).await {
                    Ok(Dialed::Connected(c)) => return Ok(c),
                    Ok(Dialed::NotLeader(Some(leader))) if leader != addr => addr = leader,
                    Ok(Dialed::NotLeader(_)) => {
                        saw_follower = true;
                        break;
                    }
                    Err(e @ (ClientError::Setup(_) | ClientError::Refused(_))) => return Err(e),
                    Err(e) => {
                        last_error = Some(e);
                        break;
                    }
                }
            }
        }
        // Without any replica answering there is nothing to wait for; with followers, an election is on.
        if !saw_follower || tokio::time::Instant::now() >= deadline {
            return Err(match (saw_follower, last_error) {
                (false, Some(e)) => e,
                _ => ClientError::NoLeader(coordinator.to_string()),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Dials one replica with mutual TLS and exchanges hellos on the first stream.
async fn connect_one(
    coordinator: &str,
    ca_pem: &str,
    client: &CertifiedPem,
    timeout: Duration,
) -> Result<Dialed, ClientError> {
    let setup = |e: String| ClientError::Setup(e);
    let config =
        quinn_client_config(ca_pem, client).map_err(|e| setup(format!("TLS config from the credentials: {e}")))?;
    let (addr, server_name) = resolve(coordinator).await.map_err(|e| setup(e.to_string()))?;
    let mut endpoint =
        quinn::Endpoint::client(bind_address_for(addr)).map_err(|e| setup(format!("open UDP socket: {e}")))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(addr, &server_name).map_err(|e| setup(e.to_string()))?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(ClientError::Connect { addr: coordinator.to_string(), reason: e.to_string() }),
        Err(_) => return Err(ClientError::Timeout(coordinator.to_string())),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
        refusal(&conn).unwrap_or_else(|| ClientError::Connect { addr: coordinator.to_string(), reason: e.to_string() })
    })?;
    let hello = async {
        write_frame(&mut send, &Hello::new(Intent::Request)).await?;
        expect_frame(&mut recv).await
    };
    let reply = match hello.await {
        Ok(r) => r,
        Err(e) => return Err(refusal(&conn).unwrap_or(ClientError::Frame(e))),
    };
    let server = match reply {
        HelloReply::Ok { protocol_version, software_version } => ServerHello { protocol_version, software_version },
        HelloReply::Refused { reason } => return Err(ClientError::Refused(reason)),
        HelloReply::NotLeader { leader } => {
            conn.close(0u32.into(), b"going to the leader");
            return Ok(Dialed::NotLeader(leader));
        }
    };
    Ok(Dialed::Connected((endpoint, conn, send, recv, server)))
}

/// The coordinator closed the connection before the hello and said why (a revoked or unrecorded certificate,
/// a state store it cannot read): that reason, rather than "connection lost".
fn refusal(conn: &quinn::Connection) -> Option<ClientError> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) if !c.reason.is_empty() => {
            Some(ClientError::Refused(String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_addresses_split_on_commas() {
        assert_eq!(coordinator_addresses("a:1, b:2,,"), ["a:1", "b:2"]);
        assert_eq!(coordinator_addresses("[::1]:7443"), ["[::1]:7443"]);
    }

    #[test]
    fn clients_bind_the_family_of_the_peer() {
        assert!(bind_address_for("[::1]:7443".parse().unwrap()).is_ipv6());
        assert!(bind_address_for("127.0.0.1:7443".parse().unwrap()).is_ipv4());
    }
}
