//! `ferryctl changes`: what changed in a cluster, read back from its change log (the segments in the index
//! whose times overlap the asked window, each checked whole by its hash, trailer and continuity).

use ferry_common::protocol::ChangeRow;
use tokio_util::sync::CancellationToken;

use super::index::{self, SegmentEntry};
use super::ChangeLog;
use crate::store::StoreError;

/// Why changes could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error("cluster {0} has no change log; turn it on with spec.backupconfiguration.pointintime.enabled")]
    NoLog(String),
    #[error("the change log of {0} is encrypted and this coordinator has no --identity that opens it; run `ferryctl changes` against a coordinator started with --identity")]
    Encrypted(String),
    #[error("state store: {0}")]
    State(#[from] crate::state::StateError),
    #[error("backup store: {0}")]
    Store(#[from] StoreError),
    #[error("segment {name} is damaged: {why}")]
    Damaged { name: String, why: String },
}

/// What to list.
#[derive(Debug, Clone)]
pub struct Query {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub prefix: Vec<u8>,
    pub limit: usize,
}

impl ChangeLog {
    /// The changes of `cluster` matching `q`, oldest first, at most `q.limit`.
    pub async fn changes(
        &self,
        cluster: &str,
        q: &Query,
        cancel: &CancellationToken,
    ) -> Result<Vec<ChangeRow>, ChangesError> {
        let deps = self.deps();
        if self.head(cluster).is_none_or(|h| h.start_revision == 0) {
            return Err(ChangesError::NoLog(cluster.to_string()));
        }
        let segments: Vec<SegmentEntry> = index::segments(deps.state.as_ref(), cluster)?
            .into_iter()
            .filter(|s| {
                q.since_ms.is_none_or(|t| s.last_time_ms >= t) && q.until_ms.is_none_or(|t| s.first_time_ms <= t)
            })
            .collect();
        let mut rows = Vec::new();
        for s in segments {
            if rows.len() >= q.limit {
                break;
            }
            let bytes = deps.store.read_segment(cluster, &s.name, cancel).await?;
            let identities = deps.identities.clone();
            if s.encrypted && identities.is_none() {
                return Err(ChangesError::Encrypted(cluster.to_string()));
            }
            let q = q.clone();
            let room = q.limit - rows.len();
            let more = tokio::task::spawn_blocking(move || read_rows(&s, &bytes, identities.as_ref(), &q, room))
                .await
                .map_err(|e| ChangesError::Damaged { name: "?".into(), why: e.to_string() })??;
            rows.extend(more);
        }
        Ok(rows)
    }
}

/// The rows of one segment, checked against its index entry.
fn read_rows(
    s: &SegmentEntry,
    bytes: &[u8],
    identities: Option<&ferry_common::encryption::Identities>,
    q: &Query,
    room: usize,
) -> Result<Vec<ChangeRow>, ChangesError> {
    use crate::pointintime::{open_segment, SegmentReadError};
    let opened = open_segment(&s.into(), bytes, identities).map_err(|e| match e {
        SegmentReadError::Encrypted(_) => ChangesError::Encrypted(String::new()),
        SegmentReadError::Damaged { name, why } => ChangesError::Damaged { name, why },
    })?;
    let mut rows = Vec::new();
    for rev in opened.revisions {
        if q.since_ms.is_some_and(|t| rev.time_ms < t) || q.until_ms.is_some_and(|t| rev.time_ms > t) {
            continue;
        }
        for e in rev.events {
            if rows.len() < room && e.key.starts_with(&q.prefix) {
                rows.push(ChangeRow {
                    revision: rev.revision,
                    time_ms: rev.time_ms,
                    kind: e.kind,
                    key: e.key,
                    value_size: e.value.len() as u64,
                });
            }
        }
    }
    Ok(rows)
}
