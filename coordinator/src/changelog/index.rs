//! The change log's index in the state store, per cluster: a small head record (epoch, covered revision, the
//! chain's last hash, gaps) written on every change, and one record per stored segment. The store's listing
//! can rebuild the segments (their names say their range), but the index is what the coordinator reads: no
//! LIST on the hot path.

use ferry_common::resources::{ChangeLogGap, Timestamp};
use serde::{Deserialize, Serialize};

use crate::state::{StateError, StateStore};

/// Gaps kept in the head (the newest); older ones stay in the log and the metrics.
pub const MAX_GAPS: usize = 100;

/// A cluster's change log as the coordinator knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Head {
    pub lineage: u32,
    /// The last epoch handed to a watcher; every assignment raises it first.
    pub epoch: u64,
    /// The first revision of the log (0: not started yet).
    pub start_revision: i64,
    pub start_time: Option<Timestamp>,
    /// Every revision up to this one is in a stored segment or a recorded gap.
    pub covered_revision: i64,
    pub covered_time: Option<Timestamp>,
    /// The sha256 (hex) of the last stored segment; empty before the first.
    pub last_sha256: String,
    pub segments: u64,
    pub stored_bytes: u64,
    pub gaps: Vec<ChangeLogGap>,
    /// The restore that started this lineage (empty for the first): a restored cluster has a new history,
    /// so the log goes on as a new branch and the old one stays as it was.
    pub restore_id: String,
    /// The lineages before this one, oldest first.
    pub earlier: Vec<EarlierLineage>,
}

/// A lineage a restore ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EarlierLineage {
    pub lineage: u32,
    pub start_revision: i64,
    pub covered_revision: i64,
    pub covered_time: Option<Timestamp>,
    /// Its gaps, as they stood when the restore ended it.
    pub gaps: Vec<ChangeLogGap>,
}

impl Head {
    /// The log after `restore_id` restored the cluster: a new lineage from the restored cluster's verified
    /// revision + 1 on (0: from wherever the next watcher finds etcd), the current one kept as it was (its
    /// segments stay under their lineage).
    pub fn fork(&self, restore_id: &str, restored_revision: i64) -> Head {
        let mut earlier = self.earlier.clone();
        if self.start_revision != 0 {
            earlier.push(EarlierLineage {
                lineage: self.lineage,
                start_revision: self.start_revision,
                covered_revision: self.covered_revision,
                covered_time: self.covered_time,
                gaps: self.gaps.clone(),
            });
        }
        let now = Some(Timestamp::now());
        let started = restored_revision > 0;
        Head {
            lineage: self.lineage + 1,
            epoch: self.epoch,
            restore_id: restore_id.to_string(),
            earlier,
            start_revision: if started { restored_revision + 1 } else { 0 },
            start_time: now.filter(|_| started),
            covered_revision: restored_revision.max(0),
            covered_time: now.filter(|_| started),
            ..Default::default()
        }
    }

    pub fn last_sha256(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(v) = hex::decode(&self.last_sha256) {
            if v.len() == 32 {
                out.copy_from_slice(&v);
            }
        }
        out
    }

    /// Records a gap (bounded list) and moves the covered revision past it.
    pub fn gap(&mut self, from: i64, to: i64, reason: String) {
        self.gaps.push(ChangeLogGap {
            fromrevision: from,
            torevision: to,
            reason,
            at: Timestamp::now(),
            closedby: String::new(),
        });
        if self.gaps.len() > MAX_GAPS {
            let extra = self.gaps.len() - MAX_GAPS;
            self.gaps.drain(..extra);
        }
        self.covered_revision = self.covered_revision.max(to);
        self.covered_time = Some(Timestamp::now());
    }
}

/// One stored segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub lineage: u32,
    pub first_revision: i64,
    pub last_revision: i64,
    pub epoch: u64,
    /// The object's name under the cluster (`segment::object_name`).
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub prev_sha256: String,
    pub events: u64,
    pub plain_bytes: u64,
    /// Coordinator-clock Unix ms of its first and last revision.
    pub first_time_ms: i64,
    pub last_time_ms: i64,
    /// Whether it is sealed with age (to the cluster's recipients at the time).
    pub encrypted: bool,
    pub stored_at: Timestamp,
}

fn head_key(cluster: &str) -> String {
    format!("changelog/{cluster}/head")
}

fn segments_prefix(cluster: &str) -> String {
    format!("changelog/{cluster}/seg/")
}

fn segment_key(cluster: &str, lineage: u32, first: i64) -> String {
    format!("{}{lineage:08x}/{first:016x}", segments_prefix(cluster))
}

fn corrupt(key: &str, error: serde_json::Error) -> StateError {
    StateError::Corrupt { key: key.to_string(), error }
}

/// The record at exactly `key` (the store lists by prefix).
fn get<T: serde::de::DeserializeOwned>(state: &dyn StateStore, key: &str) -> Result<Option<T>, StateError> {
    for (k, v) in state.list_records(key)? {
        if k == key {
            return serde_json::from_slice(&v).map(Some).map_err(|e| corrupt(&k, e));
        }
    }
    Ok(None)
}

pub fn load_head(state: &dyn StateStore, cluster: &str) -> Result<Option<Head>, StateError> {
    get(state, &head_key(cluster))
}

pub fn save_head(state: &dyn StateStore, cluster: &str, head: &Head) -> Result<(), StateError> {
    let value = serde_json::to_vec(head).map_err(StateError::Encode)?;
    state.put_record(&head_key(cluster), &value)
}

/// Stores a segment's entry (one that starts where another did, from an older epoch, replaces it).
pub fn save_segment(state: &dyn StateStore, cluster: &str, s: &SegmentEntry) -> Result<(), StateError> {
    let value = serde_json::to_vec(s).map_err(StateError::Encode)?;
    state.put_record(&segment_key(cluster, s.lineage, s.first_revision), &value)
}

/// Forgets one segment's entry (retention deleted it).
pub fn delete_segment(state: &dyn StateStore, cluster: &str, s: &SegmentEntry) -> Result<(), StateError> {
    state.delete_record(&segment_key(cluster, s.lineage, s.first_revision))
}

/// The segment of `cluster` that starts at `first` in `lineage`, if indexed.
pub fn segment(
    state: &dyn StateStore,
    cluster: &str,
    lineage: u32,
    first: i64,
) -> Result<Option<SegmentEntry>, StateError> {
    get(state, &segment_key(cluster, lineage, first))
}

/// Every segment of `cluster`, in revision order (lineage, then first revision).
pub fn segments(state: &dyn StateStore, cluster: &str) -> Result<Vec<SegmentEntry>, StateError> {
    let mut out = Vec::new();
    for (k, v) in state.list_records(&segments_prefix(cluster))? {
        out.push(serde_json::from_slice::<SegmentEntry>(&v).map_err(|e| corrupt(&k, e))?);
    }
    out.sort_by_key(|s| (s.lineage, s.first_revision));
    Ok(out)
}

/// Forgets a cluster's change log index (the cluster was deleted); its objects stay in the store.
pub fn forget(state: &dyn StateStore, cluster: &str) -> Result<(), StateError> {
    for (k, _) in state.list_records(&format!("changelog/{cluster}/"))? {
        state.delete_record(&k)?;
    }
    Ok(())
}
