//! Sealed segments waiting on disk to be stored, oldest first, bounded by their bytes. A segment that does
//! not fit is not kept: its revisions become a gap (the watch never waits for the store). Gaps queue with the
//! segments so the coordinator hears of everything in revision order.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use ferry_common::protocol::SegmentInfo;
use tokio::sync::Notify;

use crate::metrics::METRICS;

/// The suffix of spooled files (only these are cleaned out).
const SUFFIX: &str = ".fseg-spool";

pub const SPOOL_FULL: &str = "the spool is full: the store or coordinator has not taken segments";

/// What waits to be sent to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Segment { info: SegmentInfo, path: PathBuf },
    Gap { from: i64, to: i64, reason: String },
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    bytes: u64,
}

/// Shared by the watch loop (which adds) and the uploader (which takes from the front).
#[derive(Clone)]
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Spool {
    /// Opens `dir` (created 0700), deleting what an earlier watch left: a new epoch starts again from the
    /// coordinator's covered revision.
    pub fn open(dir: &Path, limit: u64) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create the spool directory {}", dir.display()))?;
        let spool = Self { dir: dir.to_owned(), limit, state: Arc::default(), changed: Arc::default() };
        spool.clean()?;
        Ok(spool)
    }

    /// Deletes every spooled file.
    pub fn clean(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("read {}", self.dir.display()))? {
            let path = entry?.path();
            if path.to_string_lossy().ends_with(SUFFIX) {
                std::fs::remove_file(&path).with_context(|| format!("delete {}", path.display()))?;
            }
        }
        self.lock().queue.clear();
        self.set_bytes(0);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_bytes(&self, bytes: u64) {
        self.lock().bytes = bytes;
        METRICS.changelog_spool_bytes.set(bytes as i64);
    }

    /// Spools a sealed segment; `false` when it does not fit (the caller records a gap).
    pub fn offer(&self, info: SegmentInfo, bytes: &[u8]) -> Result<bool> {
        {
            let mut s = self.lock();
            if s.bytes.saturating_add(bytes.len() as u64) > self.limit {
                return Ok(false);
            }
            s.bytes += bytes.len() as u64;
        }
        let path = self.dir.join(format!("{:016x}-{:016x}{SUFFIX}", info.first_revision, info.last_revision));
        let written = write_private(&path, bytes);
        let mut s = self.lock();
        if let Err(e) = written {
            s.bytes -= bytes.len() as u64;
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        METRICS.changelog_spool_bytes.set(s.bytes as i64);
        s.queue.push_back(Item::Segment { info, path });
        drop(s);
        self.changed.notify_one();
        Ok(true)
    }

    /// Queues a gap, joined to a gap queued just before it.
    pub fn gap(&self, from: i64, to: i64, reason: &str) {
        let mut s = self.lock();
        match s.queue.back_mut() {
            Some(Item::Gap { to: last_to, reason: r, .. }) if *last_to + 1 == from && r == reason => *last_to = to,
            _ => s.queue.push_back(Item::Gap { from, to, reason: reason.into() }),
        }
        drop(s);
        self.changed.notify_one();
    }

    /// The oldest item, left in place until [`Self::done`].
    pub async fn front(&self) -> Item {
        loop {
            let notified = self.changed.notified();
            if let Some(item) = self.lock().queue.front().cloned() {
                return item;
            }
            notified.await;
        }
    }

    /// The oldest item was sent (a segment: stored); its file is deleted.
    pub fn done(&self) -> Result<()> {
        let mut s = self.lock();
        if let Some(Item::Segment { info, path }) = s.queue.pop_front() {
            s.bytes = s.bytes.saturating_sub(info.size);
            METRICS.changelog_spool_bytes.set(s.bytes as i64);
            drop(s);
            std::fs::remove_file(&path).with_context(|| format!("delete {}", path.display()))?;
        }
        Ok(())
    }

    /// Nothing waits and nothing is being sent.
    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(first: i64, last: i64, size: u64) -> SegmentInfo {
        SegmentInfo {
            first_revision: first,
            last_revision: last,
            size,
            sha256: [0; 32],
            md5: [0; 16],
            prev_sha256: [0; 32],
            events: 1,
            plain_bytes: 1,
            first_time_ms: 0,
            last_time_ms: 0,
        }
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_items_leave_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0-1.fseg-spool"), b"left over").unwrap();
        std::fs::write(dir.path().join("other"), b"not ours").unwrap();
        let spool = Spool::open(dir.path(), 100).unwrap();
        assert!(!dir.path().join("0-1.fseg-spool").exists(), "leftovers are cleaned out");
        assert!(dir.path().join("other").exists());
        assert!(spool.offer(info(1, 2, 60), &[1; 60]).unwrap());
        assert!(!spool.offer(info(3, 4, 50), &[2; 50]).unwrap(), "60 + 50 > 100");
        spool.gap(3, 4, SPOOL_FULL);
        spool.gap(5, 6, SPOOL_FULL);
        assert!(spool.offer(info(7, 7, 40), &[3; 40]).unwrap());
        assert_eq!(spool.bytes(), 100);
        let Item::Segment { info: first, path } = spool.front().await else { panic!("a segment first") };
        assert_eq!(first.first_revision, 1);
        assert_eq!(std::fs::read(&path).unwrap(), [1; 60]);
        spool.done().unwrap();
        assert!(!path.exists());
        assert_eq!(spool.front().await, Item::Gap { from: 3, to: 6, reason: SPOOL_FULL.into() }, "gaps joined");
        spool.done().unwrap();
        assert!(matches!(spool.front().await, Item::Segment { info, .. } if info.first_revision == 7));
        spool.done().unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
    }
}
