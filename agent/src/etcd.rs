//! The agent's etcd member: facts for registration and the raw snapshot stream.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, SnapshotStreaming, TlsOptions};
use ferry_common::protocol::{EtcdFacts, HashKvReply, HashKvResult};

/// How long one etcd RPC (other than the snapshot stream) may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `HashKV` may take: it hashes every key version, seconds on a multi-GiB database; below the
/// coordinator's 20 s wait, so a slow etcd is reported as such rather than as a silent agent.
const HASH_KV_TIMEOUT: Duration = Duration::from_secs(15);
/// How long etcd may take to start a snapshot: it first commits its pending batch, an fsync that a busy disk
/// (a big write just before, other I/O on the node) can hold for many seconds.
const SNAPSHOT_OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// TLS files for etcd's client port (kubeadm: /etc/kubernetes/pki/etcd/…).
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A connection to this agent's own etcd member (the first `--etcd-endpoints` URL).
#[derive(Clone)]
pub struct EtcdMember {
    client: Client,
    opts: ConnectOptions,
    pub endpoint: String,
}

impl EtcdMember {
    pub async fn connect(endpoint: &str, tls: &EtcdTls) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(RPC_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
        if tls.cacert.is_some() || tls.cert.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.cacert {
                let pem = std::fs::read(ca).with_context(|| format!("read --etcd-cacert {}", ca.display()))?;
                t = t.ca_certificate(Certificate::from_pem(pem));
            }
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c).with_context(|| format!("read --etcd-cert {}", c.display()))?;
                    let key = std::fs::read(k).with_context(|| format!("read --etcd-key {}", k.display()))?;
                    t = t.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => anyhow::bail!("--etcd-cert and --etcd-key go together; give both or neither"),
            }
            opts = opts.with_tls(t);
        }
        // Connecting is lazy in tonic: this succeeds even while etcd is down, and RPCs fail until it is up.
        let client = Client::connect([endpoint], Some(opts.clone()))
            .await
            .with_context(|| format!("connect to etcd at {endpoint}"))?;
        Ok(Self { client, opts, endpoint: endpoint.to_string() })
    }

    /// A client on a connection of its own, for requests that must not queue behind the snapshot stream.
    pub async fn separate_client(&self) -> Result<Client> {
        Client::connect([&self.endpoint], Some(self.opts.clone()))
            .await
            .with_context(|| format!("connect to etcd at {}", self.endpoint))
    }

    /// The member's status as the coordinator wants it.
    pub async fn facts(&self) -> Result<EtcdFacts> {
        let mut c = self.client.clone();
        let st = tokio::time::timeout(RPC_TIMEOUT, c.status())
            .await
            .with_context(|| format!("etcd status at {} timed out", self.endpoint))?
            .with_context(|| format!("etcd status at {}", self.endpoint))?;
        let header = st.header().context("etcd status carried no header")?;
        Ok(EtcdFacts {
            member_id: header.member_id(),
            cluster_id: header.cluster_id(),
            etcd_version: st.version().to_string(),
            db_size: st.db_size(),
            raft_applied_index: st.raft_applied_index(),
            revision: header.revision(),
            leader: st.leader() == header.member_id(),
            leader_id: st.leader(),
            error: None,
        })
    }

    /// etcd's `HashKV` at `revision`, with the member's identity and current revision; a failure is part of the
    /// reply (the coordinator reports unreachable members, it does not guess).
    pub async fn hash_kv(&self, revision: i64) -> HashKvReply {
        let (member_id, cluster_id, current_revision) = match self.facts().await {
            Ok(f) => (f.member_id, f.cluster_id, f.revision),
            Err(e) => {
                let result = HashKvResult::Failed { error: format!("{e:#}") };
                return HashKvReply { member_id: 0, cluster_id: 0, current_revision: 0, result };
            }
        };
        let mut c = self.client.clone();
        // HashKV reads the whole key space: give it longer than a status call.
        let result = match tokio::time::timeout(HASH_KV_TIMEOUT, c.hash_kv(revision)).await {
            Err(_) => HashKvResult::Failed { error: format!("etcd HashKV at {} timed out", self.endpoint) },
            Ok(Ok(r)) => HashKvResult::Hash { hash: r.hash(), compact_revision: r.compact_version() },
            // etcd's words (mvcc.ErrCompacted, mvcc.ErrFutureRev); the gRPC code alone does not tell them apart.
            Ok(Err(e)) if e.to_string().contains("required revision has been compacted") => HashKvResult::Compacted,
            Ok(Err(e)) if e.to_string().contains("required revision is a future revision") => {
                HashKvResult::FutureRevision
            }
            Ok(Err(e)) => HashKvResult::Failed { error: format!("etcd HashKV at {}: {e}", self.endpoint) },
        };
        HashKvReply { member_id, cluster_id, current_revision, result }
    }

    /// Opens etcd's snapshot stream. etcd holds a bbolt read transaction open until the stream ends.
    pub async fn snapshot(&self) -> Result<SnapshotStreaming> {
        let mut c = self.client.clone();
        tokio::time::timeout(SNAPSHOT_OPEN_TIMEOUT, c.snapshot())
            .await
            .context("opening etcd's snapshot stream timed out")?
            .context("open etcd snapshot stream")
    }
}
