//! The change-log watcher: watches the whole key space from where the log is covered, checks continuity,
//! cuts segments at revision boundaries, spools them on disk and stores them through the coordinator.
//!
//! Rooms: [`assemble`] (watch responses → whole revisions, gaps), [`segmenter`] (revisions → sealed
//! segments), [`spool`] (segments on disk, bounded), [`upload`] (spool → store), [`source`] (etcd's watch
//! and leases), [`session`] (the loops, over any byte stream), [`clock`] (the coordinator's time).

pub mod assemble;
pub mod clock;
pub mod segmenter;
pub mod session;
pub mod source;
pub mod spool;
pub mod upload;

use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_common::encryption::parse_recipients;
use ferry_common::protocol::{write_frame, WatchAssignment, WatchMsg};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::EtcdMember;
use assemble::Assembler;
use clock::Clock;
use segmenter::{SegmentParams, Segmenter};
use session::{Ended, Session};
use spool::Spool;

/// Responses queued between etcd's watch and the loop: few, a fragment may be 1.5 MiB (etcd's request limit).
const INPUT_QUEUE: usize = 4;

/// What the agent knows of itself for a watch.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// The cluster named in every trailer (from the agent's certificate).
    pub cluster: String,
    /// Where sealed segments wait to be stored.
    pub spool_dir: PathBuf,
}

/// The default spool directory: under the OS temp dir.
/// Each epoch spools in a directory of its own, so a new watch never deletes what an ending one still
/// sends; older epochs' directories (a crashed agent's, or an epoch the coordinator ended) are removed.
fn epoch_spool(root: &std::path::Path, epoch: u64) -> PathBuf {
    let dir = root.join(format!("epoch-{epoch:016x}"));
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let older =
                name.strip_prefix("epoch-").and_then(|h| u64::from_str_radix(h, 16).ok()).is_some_and(|n| n < epoch);
            if older {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    dir
}

pub fn default_spool_dir() -> PathBuf {
    std::env::temp_dir().join("ferry-agent-spool")
}

/// etcd before 3.5.18 (3.4.36 on 3.4) could lose or repeat watch events near compaction.
fn watch_is_sound(version: &str) -> bool {
    use crate::etcd::version_at_least;
    if version.starts_with("3.4.") {
        version_at_least(version, (3, 4, 36))
    } else {
        version_at_least(version, (3, 5, 18))
    }
}

/// Runs one watch epoch until the coordinator ends it, etcd fails or `cancel` fires.
pub async fn run<W, R>(
    etcd: EtcdMember,
    assignment: WatchAssignment,
    settings: WatchSettings,
    mut send: W,
    recv: R,
    cancel: CancellationToken,
) -> Result<()>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let arrived = Instant::now();
    let epoch_dir = settings.spool_dir.join(format!("epoch-{:016x}", assignment.epoch));
    let prepared = async {
        let mut client = etcd.separate_client().await?;
        // etcd may be restarting: it gets as long as a broken watch does.
        let (member_id, etcd_version, revision) = loop {
            match source::member(&mut client).await {
                Ok(m) => break m,
                Err(e) if arrived.elapsed() < source::FAILING_LIMIT && !cancel.is_cancelled() => {
                    warn!("etcd does not answer yet: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let recipients = parse_recipients(&assignment.recipients)?;
        let spool = Spool::open(&epoch_spool(&settings.spool_dir, assignment.epoch), assignment.spool_bytes)?;
        Ok::<_, anyhow::Error>((client, member_id, etcd_version, revision, recipients, spool))
    }
    .await;
    let (client, member_id, etcd_version, revision, recipients, spool) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let error = format!("{e:#}");
            write_frame(&mut send, &WatchMsg::Failed { error: error.clone() }).await.context("send Failed")?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
            bail!(error);
        }
    };
    let from = if assignment.from_revision > 0 { assignment.from_revision } else { revision + 1 };
    info!(from, member_id, %etcd_version, "watching etcd");
    if !watch_is_sound(&etcd_version) {
        warn!(%etcd_version, "this etcd can lose or repeat watch events near a compaction (fixed in 3.5.18 and 3.4.36): the log's verification against the next full backup will tell");
    }
    let next = Arc::new(AtomicI64::new(from));
    let (tx, input) = mpsc::channel(INPUT_QUEUE);
    let watch_cancel = cancel.child_token();
    let _stop_watch = watch_cancel.clone().drop_guard();
    tokio::spawn(source::watch(client.watch_client(), from, next.clone(), tx, watch_cancel));
    let session = Session {
        assembler: Assembler::new(from),
        segmenter: Segmenter::new(SegmentParams {
            cluster: settings.cluster,
            lineage: assignment.lineage,
            epoch: assignment.epoch,
            member_id,
            etcd_version: etcd_version.clone(),
            zstd_level: assignment.zstd_level,
            recipients,
            cut_after: Duration::from_millis(assignment.cut_after_ms),
            cut_bytes: assignment.cut_bytes,
        }),
        spool: spool.clone(),
        leases: client.lease_client(),
        clock: Clock::new(assignment.coordinator_time, arrived),
        target: assignment.target,
        prev_sha256: assignment.prev_sha256,
        next,
        input,
    };
    let started = WatchMsg::Started { from_revision: from, member_id, etcd_version };
    let ended = session.run(started, send, recv, cancel).await;
    if let Err(e) = spool.clean() {
        warn!("failed to clean the spool: {e:#}");
    }
    let _ = std::fs::remove_dir(&epoch_dir);
    match ended {
        Ended::Stopped(reason) => {
            info!(%reason, "the coordinator stopped the watch");
            Ok(())
        }
        Ended::Closed => Ok(()),
        Ended::Failed(e) => bail!(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn etcd_versions_with_the_watch_bugs_are_known() {
        for (v, sound) in [("3.5.16", false), ("3.5.18", true), ("3.6.0", true), ("3.4.23", false), ("3.4.36", true)] {
            assert_eq!(super::watch_is_sound(v), sound, "{v}");
        }
    }
}
