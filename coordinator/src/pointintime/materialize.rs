//! Rebuilding a cluster's state at a revision: a full backup restored with etcd's own tool into a throw-away
//! etcd on unix sockets (nothing else on the host can reach it), then every revision of the change log after
//! the backup's up to the target applied in order, one transaction per revision. Because every revision of
//! the log has at least one event and one transaction makes exactly one revision, the rebuilt etcd passes
//! through the same revisions as the original: keys keep their create and mod revisions and versions, and
//! each transaction's answer is checked to land on the revision the log says. Leases the keys need are
//! granted with their ids and granted TTLs (what etcd itself gives leases when a restored member starts),
//! and every lease is kept alive while the log is applied, so none expires and deletes keys in between.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, LeaseGrantOptions, PutOptions, Txn, TxnOp, TxnResponse};
use ferry_common::encryption::Identities;
use ferry_common::protocol::{PlanSegment, PointInTimePlan};
use ferry_common::resources::Resource;
use ferry_common::segment::{EventKind, Revision};
use tokio_util::sync::CancellationToken;

use super::{check_chain, open_segment_blocking};
use crate::restore_check::{start_restored, Running};

/// A lease a put needs that no segment recorded a grant for (the watcher saw its keys before it could ask
/// etcd about the lease) is granted with this TTL: an hour, Kubernetes' event TTL.
const UNKNOWN_LEASE_TTL: i64 = 3600;
/// How often the leases are looked at for keeping alive.
const KEEPALIVE_TICK: Duration = Duration::from_millis(500);

/// The throw-away etcd's flags: no fsync (the scratch copy is thrown away on any failure), room for the
/// largest transaction and database a cluster can hold.
fn etcd_flags() -> Vec<&'static str> {
    let mut v = vec![
        "--quota-backend-bytes",
        "8589934592",
        "--max-txn-ops",
        "1000000",
        "--max-request-bytes",
        "268435456",
        "--snapshot-count",
        "1000000",
    ];

    // etcd 3.4 (without etcdutl) has no such flag.
    if ferry_common::snapshot::restore_tool() == "etcdutl" {
        v.push("--unsafe-no-fsync");
    }
    v
}

/// What a rebuild did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The full backup the rebuild started from, and the revision its snapshot is at.
    pub base_id: String,
    pub base_revision: i64,
    /// The revision rebuilt.
    pub revision: i64,
    pub revisions_applied: u64,
    pub events_applied: u64,
    pub segments_read: u64,
    pub leases_granted: u64,
    /// Leases granted with [`UNKNOWN_LEASE_TTL`] because no grant was recorded.
    pub leases_unknown: u64,
    pub elapsed: Duration,
}

/// The rebuilt state, served by a throw-away etcd until dropped.
pub struct Rebuilt {
    pub etcd: Running,
    pub client: Client,
    pub outcome: Outcome,
}

/// Where a rebuild reads from: ferryctl through the coordinator, the coordinator from its store.
pub trait Source {
    /// Writes the plan's full backup `base` (an `EtcdBackups` resource) as a plain etcd snapshot at `out`,
    /// through every check a restore makes; `false` when it is no longer stored.
    fn base(&mut self, base: &Resource, out: &Path) -> impl std::future::Future<Output = Result<bool>>;
    /// A segment's stored bytes, one at a time, in plan order.
    fn segment(&mut self, s: &PlanSegment) -> impl std::future::Future<Output = Result<Vec<u8>>>;
}

/// Connects to the throw-away etcd's unix socket, for at most `timeout`.
async fn connect(etcd: &Running, timeout: Duration, cancel: &CancellationToken) -> Result<Client> {
    let socket = etcd.client_socket();
    let deadline = Instant::now() + timeout;
    loop {
        let path = socket.clone();
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_static("http://throwaway.invalid")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await?;
            let mut client = Client::from_channel(etcd_client::Channel::Tonic(channel), None).await?;
            client.status().await?;
            anyhow::Ok(client)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) if Instant::now() > deadline => {
                return Err(e.context(format!("the throw-away etcd did not answer within {}s", timeout.as_secs())))
            }
            Err(_) if Instant::now() > deadline => {
                bail!("the throw-away etcd did not answer within {}s", timeout.as_secs())
            }
            _ => {}
        }
        tokio::select! {
            () = cancel.cancelled() => bail!("cancelled"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Leases to keep alive: id → (granted TTL in seconds, last refreshed).
type Leases = Arc<Mutex<HashMap<i64, (i64, Instant)>>>;

/// Refreshes each lease a third of its TTL after the last refresh, until `stop`.
async fn keep_alive(mut client: Client, leases: Leases, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(KEEPALIVE_TICK) => {}
        }
        let due: Vec<i64> = {
            let now = Instant::now();
            let l = crate::lock(&leases);
            l.iter()
                .filter(|(_, (ttl, at))| now.duration_since(*at) >= Duration::from_secs((*ttl as u64 / 3).max(1)))
                .map(|(id, _)| *id)
                .collect()
        };
        for id in due {
            let refreshed = async {
                let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await?;
                anyhow::Ok(())
            };
            if tokio::time::timeout(Duration::from_secs(5), refreshed).await.is_ok_and(|r| r.is_ok()) {
                if let Some(l) = crate::lock(&leases).get_mut(&id) {
                    l.1 = Instant::now();
                }
            }
        }
    }
}

/// What to rebuild: the state at `target` from `snapshot` (a plain etcd snapshot file, checked already) and
/// the plan's `segments` (each checked against its plan entry and the one before it; opened with
/// `identities` when sealed).
struct Rebuild<'a> {
    snapshot: &'a Path,
    target: i64,
    segments: &'a [PlanSegment],
    identities: Option<&'a Identities>,
}

/// Rebuilds `what` in a throw-away etcd under `scratch`, the segments fetched from `source`. Fails, saying
/// why, if the snapshot is past the target or the log does not reach it. `progress` is told each revision
/// applied. One transaction at a time: etcd applies concurrent requests in no promised order (sent 64 deep,
/// it reordered them in every benchmark run), and the log's order is what makes the revisions match.
async fn rebuild(
    what: Rebuild<'_>,
    scratch: &Path,
    source: &mut impl Source,
    progress: &mut (dyn FnMut(i64) + Send),
    cancel: &CancellationToken,
) -> Result<Rebuilt> {
    let started = Instant::now();
    let Rebuild { snapshot, target, segments, identities } = what;
    let (snap, dir) = (snapshot.to_path_buf(), scratch.to_path_buf());
    let etcd = tokio::task::spawn_blocking(move || start_restored(&snap, &dir, &etcd_flags()))
        .await
        .map_err(|e| anyhow!("starting the throw-away etcd panicked: {e}"))??;
    let result = async {
        let mut client = connect(&etcd, Duration::from_secs(60), cancel).await?;
        let base = client.status().await?.header().map(|h| h.revision()).unwrap_or(0);
        if base > target {
            bail!("the full backup's snapshot is at revision {base}, past the target {target}");
        }
        let leases: Leases = Arc::default();
        for l in client.leases().await?.leases() {
            let ttl = client.lease_time_to_live(l.id(), None).await?.granted_ttl();
            crate::lock(&leases).insert(l.id(), (ttl, Instant::now()));
        }
        let stop = cancel.child_token();
        let _stop_keepalive = stop.clone().drop_guard();
        tokio::spawn(keep_alive(client.clone(), leases.clone(), stop));
        let mut outcome = Outcome { base_revision: base, revision: base, ..Default::default() };
        let mut granted_ttls: HashMap<i64, i64> = HashMap::new();
        let mut next = base + 1;
        check_chain(segments).map_err(|e| anyhow!(e))?;
        for s in segments {
            if next > target {
                break;
            }
            if s.last_revision < next {
                continue;
            }
            if s.first_revision > next {
                bail!("the log misses revisions {next}..{} before segment {}", s.first_revision, s.name);
            }
            let stored = source.segment(s).await.with_context(|| format!("fetch segment {}", s.name))?;
            let opened = open_segment_blocking(s, stored, identities).await?;
            outcome.segments_read += 1;
            for l in &opened.leases {
                granted_ttls.insert(l.id, l.granted_ttl);
            }
            for rev in opened.revisions {
                if rev.revision < next || rev.revision > target {
                    continue;
                }
                if cancel.is_cancelled() {
                    bail!("cancelled");
                }
                if rev.revision != next {
                    bail!("the log misses revisions {next}..{} (segment {})", rev.revision, s.name);
                }
                grant_missing(&mut client, &rev, &leases, &granted_ttls, &mut outcome).await?;
                let answer = client.txn(transaction(&rev)).await.with_context(|| format!("apply revision {next}"))?;
                check_landed(next, &answer)?;
                outcome.revisions_applied += 1;
                outcome.events_applied += rev.events.len() as u64;
                progress(next);
                next += 1;
            }
        }
        if next <= target {
            bail!("the log ends at revision {}, before the target {target}", next - 1);
        }
        outcome.revision = target;
        outcome.elapsed = started.elapsed();
        Ok((client, outcome))
    }
    .await;
    match result {
        Ok((client, outcome)) => Ok(Rebuilt { etcd, client, outcome }),
        Err(e) => Err(etcd.with_log(e)),
    }
}

/// Rebuilds `plan`'s point under `scratch` from the first base it offers whose snapshot is at or before the
/// point (a snapshot's true revision can pass the one recorded), then the log; with `base_only`, the base
/// alone (for a key the log does not touch up to the point). `progress` is told the base's revision and each
/// revision applied.
pub async fn rebuild_plan(
    plan: &PointInTimePlan,
    identities: Option<&Identities>,
    scratch: &Path,
    base_only: bool,
    source: &mut impl Source,
    progress: &mut (dyn FnMut(i64, i64) + Send),
    cancel: &CancellationToken,
) -> Result<Rebuilt> {
    let mut why_not = Vec::new();
    for (i, base) in plan.bases.iter().enumerate() {
        let snapshot = scratch.join(format!("base-{i}.db"));
        if !source.base(base, &snapshot).await? {
            why_not.push(format!("backup {} is gone", base.metadata.id));
            continue;
        }
        let s = snapshot.clone();
        let status = tokio::task::spawn_blocking(move || ferry_common::snapshot::status(&s))
            .await
            .map_err(|e| anyhow!("snapshot status panicked: {e}"))??;
        if status.revision > plan.revision {
            why_not.push(format!("backup {} is at revision {}", base.metadata.id, status.revision));
            let _ = std::fs::remove_file(&snapshot);
            continue;
        }
        let dir = scratch.join(format!("etcd-{i}"));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (target, segments) =
            if base_only { (status.revision, &[][..]) } else { (plan.revision, &plan.segments[..]) };
        let what = Rebuild { snapshot: &snapshot, target, segments, identities };
        let mut tick = |r: i64| progress(status.revision, r);
        let mut rebuilt = rebuild(what, &dir, source, &mut tick, cancel).await?;
        rebuilt.outcome.base_id = base.metadata.id.clone();
        let _ = std::fs::remove_file(&snapshot);
        return Ok(rebuilt);
    }
    bail!("every full backup offered is past revision {} ({}); pick a later point", plan.revision, why_not.join(", "))
}

/// Writes the rebuilt state to `out` with `etcdctl snapshot save` (etcd's tool checks the hash) and stops
/// the throw-away etcd.
pub async fn save(rebuilt: Rebuilt, out: &Path) -> Result<Outcome> {
    let Rebuilt { etcd, mut client, outcome } = rebuilt;
    // The state at the point, not the log's history up to it (≈ 3.7 KB a revision: a 378 MiB base grew to
    // 908 MiB over 150 000 revisions): compacted there and defragmented before it is saved. Keys keep their
    // create and mod revisions and versions; a restore marks it compacted anyway.
    let compact = etcd_client::CompactionOptions::new().with_physical();
    client
        .compact(outcome.revision, Some(compact))
        .await
        .map_err(|e| etcd.with_log(anyhow!("compact at the point: {e}")))?;
    client.defragment().await.map_err(|e| etcd.with_log(anyhow!("defragment the rebuilt etcd: {e}")))?;
    drop(client);
    let out = out.to_path_buf();
    tokio::task::spawn_blocking(move || crate::restore_check::save_snapshot(&etcd, &out).map_err(|e| etcd.with_log(e)))
        .await
        .map_err(|e| anyhow!("saving the snapshot panicked: {e}"))??;
    Ok(outcome)
}

/// Segments and bases read from the coordinator's own store.
struct StoreSource<'a> {
    store: &'a crate::store::BackupStore,
    identities: Option<&'a Identities>,
    cluster: &'a str,
    cancel: &'a CancellationToken,
}

impl Source for StoreSource<'_> {
    async fn base(&mut self, base: &Resource, out: &Path) -> Result<bool> {
        let Some(m) = self.store.find(self.cluster, &base.metadata.id, self.cancel).await? else { return Ok(false) };
        crate::drill::fetch(self.store, self.identities, &m, out, self.cancel).await?;
        Ok(true)
    }

    async fn segment(&mut self, s: &PlanSegment) -> Result<Vec<u8>> {
        Ok(self.store.read_segment(self.cluster, &s.name, self.cancel).await?)
    }
}

impl crate::changelog::ChangeLog {
    /// Rebuilds `plan`'s point on the coordinator (with its own `--identity` for an encrypted cluster) under
    /// `scratch`, and writes it as an etcd snapshot to `out`. One at a time: a rebuild runs etcd and reads the
    /// whole base.
    pub async fn rebuild_to_file(
        &self,
        plan: &PointInTimePlan,
        scratch: &Path,
        out: &Path,
        cancel: &CancellationToken,
    ) -> Result<Outcome> {
        let _one = self
            .rebuild_slot()
            .ok_or_else(|| anyhow!("the coordinator is rebuilding another point in time; try again when it is done"))?;
        let deps = self.deps();
        let ids = deps.identities.as_ref();
        let encrypted = plan.segments.iter().any(|s| s.encrypted && s.first_revision <= plan.revision);
        if encrypted && ids.is_none() {
            bail!("the change log of {} is encrypted and this coordinator has no --identity; rebuild it with ferryctl and the identity (`--identity FILE`)", plan.cluster);
        }
        let mut source = StoreSource { store: &deps.store, identities: ids, cluster: &plan.cluster, cancel };
        let rebuilt = rebuild_plan(plan, ids, scratch, false, &mut source, &mut |_, _| {}, cancel).await?;
        save(rebuilt, out).await
    }
}

/// Grants the leases `rev`'s puts name that the rebuilt etcd does not hold yet.
async fn grant_missing(
    client: &mut Client,
    rev: &Revision,
    leases: &Leases,
    granted_ttls: &HashMap<i64, i64>,
    outcome: &mut Outcome,
) -> Result<()> {
    for e in &rev.events {
        if e.kind != EventKind::Put || e.lease == 0 || crate::lock(leases).contains_key(&e.lease) {
            continue;
        }
        let ttl = match granted_ttls.get(&e.lease) {
            Some(t) => *t,
            None => {
                outcome.leases_unknown += 1;
                UNKNOWN_LEASE_TTL
            }
        };
        client
            .lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(e.lease)))
            .await
            .with_context(|| format!("grant lease {:x} (TTL {ttl}s) for revision {}", e.lease, rev.revision))?;
        crate::lock(leases).insert(e.lease, (ttl, Instant::now()));
        outcome.leases_granted += 1;
    }
    Ok(())
}

/// One revision as one transaction.
fn transaction(rev: &Revision) -> Txn {
    let ops: Vec<TxnOp> = rev
        .events
        .iter()
        .map(|e| match e.kind {
            EventKind::Put => {
                let opts = (e.lease != 0).then(|| PutOptions::new().with_lease(e.lease));
                TxnOp::put(e.key.clone(), e.value.clone(), opts)
            }
            EventKind::Delete => TxnOp::delete(e.key.clone(), None),
        })
        .collect();
    Txn::new().and_then(ops)
}

/// Checks that revision `r`'s transaction made exactly revision `r`: one transaction makes one revision, so
/// an answer elsewhere means the log and the full backup do not join (a delete of a key the backup does not
/// hold makes no revision) or something else wrote (a lease that expired).
fn check_landed(r: i64, answer: &TxnResponse) -> Result<()> {
    let landed = answer.header().map(|h| h.revision()).unwrap_or(0);
    if landed != r {
        bail!(
            "revision {r} of the log landed on revision {landed} of the rebuilt etcd: the log and the full backup do not join (a delete of a key the backup does not hold, or a lease that expired)"
        );
    }
    Ok(())
}
