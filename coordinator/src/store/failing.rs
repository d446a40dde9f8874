//! Failures injected into a [`super::BackupStore`], for tests of what the coordinator does when its store
//! misbehaves (as neon's `simulate_failures`): a listing that hangs, writes that fail, a commit that never
//! completes. The daemon never sets any.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_util::sync::CancellationToken;

use super::StoreError;

/// What to break. Everything not named behaves normally.
#[derive(Debug, Default)]
pub struct Failures {
    /// Listings of these clusters never complete (until cancelled), like an S3 endpoint that hangs.
    pub hang_list: HashSet<String>,
    /// The next this-many listings (of any cluster) fail at once.
    pub fail_lists: AtomicU32,
    /// Every write of a pending backup fails.
    pub fail_writes: bool,
    /// Commits never complete (until cancelled).
    pub hang_commit: bool,
}

impl Failures {
    pub(super) async fn on_list(&self, cluster: Option<&str>, cancel: &CancellationToken) -> Result<(), StoreError> {
        if cluster.is_some_and(|c| self.hang_list.contains(c)) {
            cancel.cancelled().await;
            return Err(StoreError::Cancelled);
        }
        let failed = self.fail_lists.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if failed {
            return Err(StoreError::Injected("list".into()));
        }
        Ok(())
    }

    pub(super) fn on_write(&self) -> Result<(), StoreError> {
        if self.fail_writes {
            return Err(StoreError::Injected("write".into()));
        }
        Ok(())
    }

    pub(super) async fn on_commit(&self, cancel: &CancellationToken) -> Result<(), StoreError> {
        if self.hang_commit {
            cancel.cancelled().await;
            return Err(StoreError::Cancelled);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_common::resources::Timestamp;

    use super::*;
    use crate::store::{BackupStore, UploadSettings};

    const UPLOAD: UploadSettings = UploadSettings { part_size: 8 << 20, parts_in_flight: 4 };

    #[tokio::test]
    async fn injected_failures_reach_callers_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let failures = Failures { fail_writes: true, fail_lists: AtomicU32::new(1), ..Default::default() };
        let store = BackupStore::local(dir.path()).unwrap().with_failures(failures);
        let cancel = CancellationToken::new();
        assert!(matches!(store.list(None, &cancel).await, Err(StoreError::Injected(_))));
        assert!(store.list(None, &cancel).await.unwrap().is_empty(), "only one listing fails");

        let mut pending = store.begin("c", Timestamp::now(), UPLOAD, &cancel).await.unwrap();
        assert!(matches!(pending.write(b"x", &cancel).await, Err(StoreError::Injected(_))));
        pending.abort().await;
        let left: Vec<_> = std::fs::read_dir(dir.path().join("c")).unwrap().collect();
        assert!(left.is_empty(), "an aborted backup leaves no partial file: {left:?}");
    }

    #[tokio::test]
    async fn a_hanging_listing_ends_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let failures = Failures { hang_list: ["slow".to_string()].into(), ..Default::default() };
        let store = BackupStore::local(dir.path()).unwrap().with_failures(failures);
        let cancel = CancellationToken::new();
        assert!(store.list(Some("fast"), &cancel).await.is_ok());
        let hung = tokio::time::timeout(Duration::from_millis(200), store.list(Some("slow"), &cancel)).await;
        assert!(hung.is_err(), "the listing hangs");
        cancel.cancel();
        assert!(matches!(store.list(Some("slow"), &cancel).await, Err(StoreError::Cancelled)));
    }
}
