//! The change log's retention: the window stays restorable — the newest full backup at least the window old
//! (backup retention keeps it, `backup::retention::point_in_time_base`) and every segment after its revision.
//! Older segments go. A full's recorded revision is read before its snapshot opens, so it is at most the
//! snapshot's true revision: segments up to it are never needed on top of it.

use anyhow::{Context as _, Result};
use ferry_common::resources::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{index, Inner};
use crate::backup::retention::point_in_time_base;

/// Deletes `cluster`'s segments the window no longer needs; returns how many.
pub(super) async fn apply(
    inner: &Inner,
    cluster: &str,
    window_seconds: i64,
    cancel: &CancellationToken,
) -> Result<usize> {
    let deps = &inner.deps;
    let backups = deps.store.list(Some(cluster), cancel).await?;
    let listed: Vec<(String, Timestamp)> = backups.iter().map(|m| (m.id.clone(), m.backup.createdat)).collect();
    let Some(base) = point_in_time_base(&listed, window_seconds, Timestamp::now()) else { return Ok(0) };
    let Some(base) = backups.iter().find(|m| m.id == base) else { return Ok(0) };
    let head = inner.head(cluster)?.unwrap_or_default();
    let mut deleted = 0;
    for s in index::segments(deps.state.as_ref(), cluster)? {
        // Older lineages are kept whole for now: a restore's branch point decides what they still need.
        if s.lineage != head.lineage || s.last_revision > base.backup.revision {
            continue;
        }
        // A deposed leader deletes nothing: checked before each delete.
        deps.state.still_leading().context("change-log retention stops: this replica no longer leads")?;
        deps.store.delete_segment(cluster, &s.name, cancel).await?;
        index::delete_segment(deps.state.as_ref(), cluster, &s)?;
        deleted += 1;
    }
    if deleted > 0 {
        info!(%cluster, deleted, base = %base.id, "change-log retention deleted segments older than the window's base");
    }
    Ok(deleted)
}
