//! The agent's etcd member: facts for registration and the raw snapshot stream.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, SnapshotStreaming, TlsOptions, WatchOptions,
};
use ferry_common::protocol::{EtcdFacts, HashKvReply, HashKvResult};

/// How long one etcd RPC (other than the snapshot stream) may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `HashKV` may take: it hashes every key version, seconds on a multi-GiB database; below the
/// coordinator's 20 s wait, so a slow etcd is reported as such rather than as a silent agent.
const HASH_KV_TIMEOUT: Duration = Duration::from_secs(15);
/// How long etcd may take to start a snapshot: it first commits its pending batch, an fsync that a busy disk
/// (a big write just before, other I/O on the node) can hold for many seconds.
const SNAPSHOT_OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// A key nobody writes, read at revision 1 and watched from it to learn etcd's compaction revision.
const PROBE_KEY: &str = "\0ferry-compaction-probe";
/// Compactions etcd keeps the hash of (etcd's `hashStorageMaxSize`).
const HASHES_KEPT: usize = 10;
/// Compaction hashes are kept in memory from etcd 3.5.5 on (etcd PR 14120).
const HASHES_SINCE: (u64, u64, u64) = (3, 5, 5);
/// etcd sets the compaction revision before its compaction (in batches, 10 ms apart) has run, and keeps the
/// hash only when it has: a compaction counts as held once seen this long (a minute covers millions of keys).
const SETTLE: Duration = Duration::from_secs(60);

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
    compactions: Arc<Mutex<Compactions>>,
    /// The largest database (bytes) whose `HashKV` may be computed afresh; see [`Self::hash_kv`].
    hash_scan_limit: u64,
}

/// What this agent saw of etcd's compactions. etcd 3.5.5+ hashes the key space while it compacts, in small
/// batches, and answers `HashKV` at a compaction revision from the last ten it keeps in memory. Any other
/// `HashKV` hashes the whole key space with etcd's backend held: writes stall for seconds on a large
/// database. Only compactions seen to happen (the revision moving between two polls, no failed poll between)
/// are known to be held: etcd forgets them when it restarts.
#[derive(Debug, Default)]
struct Compactions {
    last: Option<i64>,
    /// Compactions seen happening, with when.
    seen: Vec<(i64, Instant)>,
}

impl Compactions {
    /// A poll's answer at `at`: `Some(revision)`, or `None` when etcd could not be asked.
    fn observe(&mut self, revision: Option<i64>, hashes_kept: bool, at: Instant) {
        match (self.last, revision) {
            (Some(before), Some(now)) if now > before && hashes_kept => {
                self.seen.push((now, at));
                if self.seen.len() > HASHES_KEPT {
                    self.seen.remove(0);
                }
            }
            (Some(before), Some(now)) if now >= before => {}
            // Unreachable, or the revision went back (another etcd behind the URL): nothing is known.
            _ => self.seen.clear(),
        }
        self.last = revision;
    }

    /// The compactions whose hash etcd has computed by `at`, oldest first.
    fn held(&self, at: Instant) -> Vec<i64> {
        self.seen.iter().filter(|(_, seen)| at.saturating_duration_since(*seen) >= SETTLE).map(|(r, _)| *r).collect()
    }
}

pub(crate) fn version_at_least(version: &str, min: (u64, u64, u64)) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    v >= min
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    e.to_string().contains("required revision has been compacted")
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
        Ok(Self {
            client,
            opts,
            endpoint: endpoint.to_string(),
            compactions: Arc::default(),
            hash_scan_limit: u64::MAX,
        })
    }

    /// Sets the largest database (bytes) whose `HashKV` may be computed afresh.
    pub fn with_hash_scan_limit(mut self, bytes: u64) -> Self {
        self.hash_scan_limit = bytes;
        self
    }

    /// A client on a connection of its own, for requests that must not queue behind the snapshot stream.
    pub async fn separate_client(&self) -> Result<Client> {
        Client::connect([&self.endpoint], Some(self.opts.clone()))
            .await
            .with_context(|| format!("connect to etcd at {}", self.endpoint))
    }

    /// The member's status as the coordinator wants it, having looked at etcd's compaction revision. etcd not
    /// answering may be etcd restarting, which forgets its compaction hashes: so does this agent.
    pub async fn facts(&self) -> Result<EtcdFacts> {
        let facts = self.read_facts(true).await;
        if facts.is_err() {
            self.forget_compactions();
        }
        facts
    }

    /// The member's status; with `observe`, etcd's compaction revision is polled too (only the periodic report
    /// does: polls racing each other could see the revision go back).
    async fn read_facts(&self, observe: bool) -> Result<EtcdFacts> {
        let mut c = self.client.clone();
        let st = tokio::time::timeout(RPC_TIMEOUT, c.status())
            .await
            .with_context(|| format!("etcd status at {} timed out", self.endpoint))?
            .with_context(|| format!("etcd status at {}", self.endpoint))?;
        let header = st.header().context("etcd status carried no header")?;
        if observe {
            let compacted = match self.compact_revision().await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!("etcd's compaction revision is unknown: {e:#}");
                    None
                }
            };
            let hashes_kept = version_at_least(st.version(), HASHES_SINCE);
            let mut c = self.compactions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            c.observe(compacted, hashes_kept, Instant::now());
        }
        let hashed_compactions =
            self.compactions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).held(Instant::now());
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
            hashed_compactions,
        })
    }

    /// etcd's compaction revision (0: never compacted). A read at revision 1 answers at once whether any
    /// compaction happened; only then is a watch from revision 1 made, which etcd cancels at once naming its
    /// compaction revision (a watch from an uncompacted revision 1 would make etcd read its whole history).
    async fn compact_revision(&self) -> Result<i64> {
        let mut c = self.client.clone();
        let read = c.get(PROBE_KEY, Some(GetOptions::new().with_revision(1).with_count_only().with_serializable()));
        match tokio::time::timeout(RPC_TIMEOUT, read).await.context("read at revision 1 timed out")? {
            Ok(_) => return Ok(0),
            Err(e) if is_compacted(&e) => {}
            Err(e) => return Err(e).context("read at revision 1"),
        }
        let watched = async {
            let mut stream = c.watch(PROBE_KEY, Some(WatchOptions::new().with_start_revision(1))).await?;
            while let Some(r) = stream.message().await? {
                if r.compact_revision() > 0 {
                    return Ok(r.compact_revision());
                }
                if r.canceled() {
                    break;
                }
            }
            anyhow::bail!("the watch from revision 1 ended without a compaction revision")
        };
        tokio::time::timeout(RPC_TIMEOUT, watched).await.context("watch from revision 1 timed out")?
    }

    fn forget_compactions(&self) {
        let mut c = self.compactions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *c = Compactions::default();
    }

    /// etcd's `HashKV` at `revision`, with the member's identity and current revision; a failure is part of the
    /// reply (the coordinator reports unreachable members, it does not guess). Asked at a compaction etcd was
    /// seen making, etcd answers from memory; any other revision makes etcd hash its whole key space while
    /// holding its backend, which this agent does only for a database within the scan limit (~50 ms).
    pub async fn hash_kv(&self, revision: i64) -> HashKvReply {
        let facts = match self.read_facts(false).await {
            Ok(f) => f,
            Err(e) => {
                let result = HashKvResult::Failed { error: format!("{e:#}") };
                return HashKvReply { member_id: 0, cluster_id: 0, current_revision: 0, db_size: 0, result };
            }
        };
        let (member_id, cluster_id, current_revision) = (facts.member_id, facts.cluster_id, facts.revision);
        let db_size = facts.db_size;
        let held = revision > 0 && facts.hashed_compactions.contains(&revision);
        if !held && u64::try_from(facts.db_size).unwrap_or(u64::MAX) > self.hash_scan_limit {
            let why = format!(
                "etcd holds no hash of revision {revision} from a compaction this agent saw, and hashing its {:.1} \
                 MiB database afresh would stall its writes (--hashkv-scan-limit-mib {})",
                facts.db_size as f64 / f64::from(1 << 20),
                self.hash_scan_limit >> 20
            );
            let result = HashKvResult::Skipped { why };
            return HashKvReply { member_id, cluster_id, current_revision, db_size, result };
        }
        let mut c = self.client.clone();
        // HashKV reads the whole key space: give it longer than a status call.
        let result = match tokio::time::timeout(HASH_KV_TIMEOUT, c.hash_kv(revision)).await {
            Err(_) => HashKvResult::Failed { error: format!("etcd HashKV at {} timed out", self.endpoint) },
            Ok(Ok(r)) => {
                // A hash from compaction names the compaction before it; one computed now names `revision`
                // itself: etcd no longer held it (it restarted between two polls), so nothing it held is known.
                if held && r.compact_version() == revision {
                    tracing::warn!(
                        revision,
                        "etcd hashed its key space afresh: it no longer held its compaction hashes"
                    );
                    self.forget_compactions();
                }
                HashKvResult::Hash { hash: r.hash(), compact_revision: r.compact_version() }
            }
            // etcd's words (mvcc.ErrCompacted, mvcc.ErrFutureRev); the gRPC code alone does not tell them apart.
            Ok(Err(e)) if is_compacted(&e) => HashKvResult::Compacted,
            Ok(Err(e)) if e.to_string().contains("required revision is a future revision") => {
                HashKvResult::FutureRevision
            }
            Ok(Err(e)) => HashKvResult::Failed { error: format!("etcd HashKV at {}: {e}", self.endpoint) },
        };
        HashKvReply { member_id, cluster_id, current_revision, db_size, result }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_compactions_seen_happening_and_settled_are_held_and_a_failed_poll_forgets_them() {
        let t0 = Instant::now();
        let later = t0 + SETTLE;
        let mut c = Compactions::default();
        c.observe(Some(100), true, t0);
        assert!(c.held(later).is_empty(), "a compaction from before the agent started may predate etcd's restart");
        c.observe(Some(100), true, t0);
        c.observe(Some(200), true, t0);
        c.observe(Some(300), true, t0 + Duration::from_secs(1));
        assert_eq!(c.held(t0), Vec::<i64>::new(), "etcd may still be compacting");
        assert_eq!(c.held(later), [200], "300 is not settled yet");
        assert_eq!(c.held(later + Duration::from_secs(1)), [200, 300]);
        c.observe(None, true, t0);
        assert!(c.held(later).is_empty());
        c.observe(Some(400), true, t0);
        assert!(c.held(later).is_empty(), "the first answer after a failure is a new start");
        c.observe(Some(500), false, t0);
        assert!(c.held(later).is_empty(), "an etcd before 3.5.5 keeps no hashes");
        let mut c = Compactions::default();
        for r in 0..20 {
            c.observe(Some(r), true, t0);
        }
        assert_eq!(c.held(later), (10..20).collect::<Vec<_>>(), "etcd keeps ten");
        c.observe(Some(5), true, t0);
        assert!(c.held(later).is_empty(), "a revision going back is another etcd");
    }

    #[test]
    fn versions_compare_by_number() {
        assert!(version_at_least("3.5.16", HASHES_SINCE));
        assert!(version_at_least("3.6.0", HASHES_SINCE));
        assert!(!version_at_least("3.5.4", HASHES_SINCE));
        assert!(!version_at_least("3.4.23", HASHES_SINCE));
        assert!(!version_at_least("", HASHES_SINCE));
    }
}
