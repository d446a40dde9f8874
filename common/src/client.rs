//! The client side of one request to the coordinator (ferryctl, `ferry-agent restore`): dial with mutual
//! TLS, say hello, send one [`AdminRequest`], read the answers.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::protocol::{expect_frame, write_frame, AdminRequest, FrameError, Hello, HelloReply, Intent};
use crate::tls::{quinn_client_config, resolve, CertifiedPem};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Dials with mutual TLS and exchanges hellos on the first stream.
async fn connect(coordinator: &str, ca_pem: &str, client: &CertifiedPem) -> Result<Connected, ClientError> {
    let setup = |e: String| ClientError::Setup(e);
    let config =
        quinn_client_config(ca_pem, client).map_err(|e| setup(format!("TLS config from the credentials: {e}")))?;
    let (addr, server_name) = resolve(coordinator).await.map_err(|e| setup(e.to_string()))?;
    let mut endpoint =
        quinn::Endpoint::client(bind_address_for(addr)).map_err(|e| setup(format!("open UDP socket: {e}")))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(addr, &server_name).map_err(|e| setup(e.to_string()))?;
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(ClientError::Connect { addr: coordinator.to_string(), reason: e.to_string() }),
        Err(_) => return Err(ClientError::Timeout(coordinator.to_string())),
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Connect { addr: coordinator.to_string(), reason: e.to_string() })?;
    write_frame(&mut send, &Hello::new(Intent::Request)).await?;
    let server = match expect_frame(&mut recv).await? {
        HelloReply::Ok { protocol_version, software_version } => ServerHello { protocol_version, software_version },
        HelloReply::Refused { reason } => return Err(ClientError::Refused(reason)),
    };
    Ok((endpoint, conn, send, recv, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_bind_the_family_of_the_peer() {
        assert!(bind_address_for("[::1]:7443".parse().unwrap()).is_ipv6());
        assert!(bind_address_for("127.0.0.1:7443".parse().unwrap()).is_ipv4());
    }
}
