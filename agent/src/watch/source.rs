//! The etcd side of a watch: the watch stream (resumed on transient errors, failed after a while) and the
//! lease look-ups made when a segment is cut.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, WatchClient, WatchOptions};
use ferry_common::segment::{Event, EventKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::assemble::Response;

/// The watch client's message limit: fragments are at most etcd's request limit (1.5 MiB by default),
/// but an etcd without fragmenting, or with a raised limit, may send more.
pub const MAX_WATCH_MESSAGE: usize = 64 * 1024 * 1024;
/// Progress is asked for after this long without a message, so idle time is proven covered.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// A watch silent this long, progress asked for, is taken for broken.
const SILENT_LIMIT: Duration = Duration::from_secs(30);
/// How long etcd may fail before the watch gives up (another watcher may do better).
pub const FAILING_LIMIT: Duration = Duration::from_secs(20);
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// One lease look-up.
const LEASE_RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// What the watch task hands the watch loop.
#[derive(Debug)]
pub enum Input {
    Response(Response),
    /// The watch broke and is being opened again: a half-received revision comes again.
    Interrupted,
    /// etcd failed for too long.
    Failed(String),
}

/// Lease look-ups (a trait so the loop is tested without etcd).
pub trait Leases: Send {
    /// Every lease etcd holds.
    fn list(&mut self) -> impl Future<Output = Result<Vec<i64>>> + Send;
    /// The TTL `id` was granted with; `None` once it expired.
    fn granted_ttl(&mut self, id: i64) -> impl Future<Output = Result<Option<i64>>> + Send;
}

impl Leases for etcd_client::LeaseClient {
    async fn list(&mut self) -> Result<Vec<i64>> {
        let r = tokio::time::timeout(LEASE_RPC_TIMEOUT, self.leases()).await.context("etcd LeaseLeases timed out")?;
        Ok(r.context("etcd LeaseLeases")?.leases().iter().map(|l| l.id()).collect())
    }

    async fn granted_ttl(&mut self, id: i64) -> Result<Option<i64>> {
        let r = tokio::time::timeout(LEASE_RPC_TIMEOUT, self.time_to_live(id, None))
            .await
            .context("etcd LeaseTimeToLive timed out")?
            .context("etcd LeaseTimeToLive")?;
        // etcd answers -1 for a lease that is gone.
        Ok((r.ttl() >= 0).then_some(r.granted_ttl()))
    }
}

/// The member's id, etcd version and current revision.
pub async fn member(client: &mut Client) -> Result<(u64, String, i64)> {
    let st = tokio::time::timeout(Duration::from_secs(10), client.status())
        .await
        .context("etcd status timed out")?
        .context("etcd status")?;
    let header = st.header().context("etcd status carried no header")?;
    Ok((header.member_id(), st.version().to_string(), header.revision()))
}

/// Watches the whole key space from `from`, sending what comes on `tx`; after a break it resumes from `next`
/// (what the loop expects next). Ends when `cancel` fires, `tx` closes, or etcd failed for [`FAILING_LIMIT`].
pub async fn watch(
    client: WatchClient,
    from: i64,
    next: Arc<AtomicI64>,
    tx: mpsc::Sender<Input>,
    cancel: CancellationToken,
) {
    let mut client = client.max_decoding_message_size(MAX_WATCH_MESSAGE);
    let mut from = from;
    let mut failing_since: Option<Instant> = None;
    loop {
        let error = match watch_once(&mut client, from, &tx, &cancel, &mut failing_since).await {
            Ok(Some(compacted)) => {
                from = (compacted + 1).max(next.load(Ordering::SeqCst));
                continue;
            }
            Ok(None) => return,
            Err(e) => e,
        };
        if cancel.is_cancelled() || tx.send(Input::Interrupted).await.is_err() {
            return;
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= FAILING_LIMIT {
            let _ = tx
                .send(Input::Failed(format!("etcd's watch failed for {}s: {error:#}", since.elapsed().as_secs())))
                .await;
            return;
        }
        tracing::warn!("etcd's watch broke, resuming: {error:#}");
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DELAY) => {}
            _ = cancel.cancelled() => return,
        }
        from = next.load(Ordering::SeqCst);
    }
}

/// One watch stream: `Ok(Some(c))` when etcd cancelled it as compacted through `c`, `Ok(None)` when the
/// watch is over, an error when it broke.
async fn watch_once(
    client: &mut WatchClient,
    from: i64,
    tx: &mpsc::Sender<Input>,
    cancel: &CancellationToken,
    failing_since: &mut Option<Instant>,
) -> Result<Option<i64>> {
    let options = WatchOptions::new().with_all_keys().with_start_revision(from).with_progress_notify().with_fragment();
    let mut stream = tokio::select! {
        s = client.watch(vec![0u8], Some(options)) => s.context("open etcd's watch")?,
        _ = cancel.cancelled() => return Ok(None),
    };
    let mut last_message = Instant::now();
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = ticker.tick() => {
                if last_message.elapsed() >= SILENT_LIMIT {
                    bail!("etcd's watch sent nothing for {}s", last_message.elapsed().as_secs());
                }
                if last_message.elapsed() >= PROGRESS_EVERY {
                    stream.request_progress().await.context("ask etcd for the watch's progress")?;
                }
            }
            message = stream.message() => {
                let Some(resp) = message.context("etcd's watch")? else {
                    bail!("etcd ended the watch");
                };
                last_message = Instant::now();
                *failing_since = None;
                let resp = convert(resp);
                if resp.canceled && resp.compact_revision == 0 {
                    return Err(anyhow!("etcd cancelled the watch"));
                }
                let compacted = resp.canceled.then_some(resp.compact_revision);
                if resp.created {
                    continue;
                }
                if tx.send(Input::Response(resp)).await.is_err() {
                    return Ok(None);
                }
                if compacted.is_some() {
                    return Ok(compacted);
                }
            }
        }
    }
}

/// Takes the events out of etcd's response (no copy of keys and values).
fn convert(resp: etcd_client::WatchResponse) -> Response {
    let pb = resp.0;
    let events = pb
        .events
        .into_iter()
        .filter_map(|e| {
            let kv = e.kv?;
            // 0: PUT, 1: DELETE (etcd's mvccpb.Event.EventType).
            let event = if e.r#type == 1 {
                Event {
                    kind: EventKind::Delete,
                    key: kv.key,
                    value: Vec::new(),
                    create_revision: 0,
                    version: 0,
                    lease: 0,
                }
            } else {
                Event {
                    kind: EventKind::Put,
                    key: kv.key,
                    value: kv.value,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    lease: kv.lease,
                }
            };
            Some((kv.mod_revision, event))
        })
        .collect();
    Response {
        header_revision: pb.header.map_or(0, |h| h.revision),
        events,
        fragment: pb.fragment,
        created: pb.created,
        canceled: pb.canceled,
        compact_revision: pb.compact_revision,
    }
}
