//! The coordinator's state store: resources, kept crash-safe.
//!
//! Behind one small trait with two implementations: the embedded default, redb ([`redb`]), whose commits are
//! durable (fsync) before they return, so nothing acknowledged to ferryctl is lost to a restart or `kill -9`;
//! and an external etcd ([`etcd`]) that several coordinator replicas share.
//!
//! A read-modify-write of resources goes through [`StateStore::transact`]: one write transaction, so two
//! writers (a job's progress tick and a configuration change, or two replicas) cannot overwrite each other's
//! update. Besides resources the store keeps a few opaque blobs created once (the CA, the QUIC keys), so
//! replicas share them.
//!
//! Each resource's labels are indexed in the same transaction that writes it ([`StateStore::list_labeled`]),
//! so finding a cluster's agents or a member's certificates costs what it finds, not the type's size (10 000
//! agents: issuing a certificate must not read all 10 000 records).
//!
//! A store that cannot write (disk full, I/O errors) says so through [`StateStore::health`], which `/readyz`,
//! the `ferry_state_store_writable` metric and the overall status show, and recovers by itself once the
//! cause is gone.

mod etcd;
mod redb;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeSet;

use ferry_common::resources::{Resource, ResourceType, Timestamp};

pub use self::etcd::{EtcdStore, EtcdStoreOptions};
pub use self::redb::RedbStore;

/// A state store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database itself failed (I/O, corruption of its pages).
    #[error("state store: {0}")]
    Db(::redb::Error),
    /// The state etcd failed or did not answer in time.
    #[error("state etcd: {0}")]
    Etcd(String),
    /// A transaction kept meeting concurrent writers of the same records.
    #[error("state etcd: transaction gave up after {0} conflicting attempts")]
    Conflict(u32),
    /// This replica's term of leadership is over (its election key is gone or belongs to a newer term): it
    /// writes nothing any more.
    #[error("state etcd: this replica is no longer the leader; the write was refused")]
    NotLeader,
    /// A record does not decode as a resource.
    #[error("state store holds an unreadable record {key:?}: {error}")]
    Corrupt { key: String, error: serde_json::Error },
    /// A resource does not encode.
    #[error("encode resource: {0}")]
    Encode(serde_json::Error),
    /// The store cannot be used right now (it failed and is not reopened yet).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A record has another type than its key says.
    #[error("state store record {0} has the wrong type")]
    WrongType(String),
}

/// The reads and writes inside one transaction.
pub trait StateTxn {
    fn get(&mut self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError>;
    /// Stores `r` (bumping `metadata.version`), returning it as stored.
    fn put(&mut self, r: Resource) -> Result<Resource, StateError>;
}

/// Where resources live. Writes bump `metadata.version` and stamp `created`/`updated`.
pub trait StateStore: Send + Sync {
    fn get(&self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError>;
    fn list(&self, rt: ResourceType) -> Result<Vec<Resource>, StateError>;
    /// Resources of type `rt` labelled `label=value`, found through the label index.
    fn list_labeled(&self, rt: ResourceType, label: &str, value: &str) -> Result<Vec<Resource>, StateError>;
    /// Stores `r`, returning it as stored (with its new version).
    fn put(&self, r: Resource) -> Result<Resource, StateError>;
    /// Removes a resource; `false` if it did not exist.
    fn delete(&self, rt: ResourceType, id: &str) -> Result<bool, StateError>;
    /// Runs `f` in one write transaction, committed only when `f` succeeds; no other write interleaves.
    fn transact(&self, f: &mut dyn FnMut(&mut dyn StateTxn) -> Result<(), StateError>) -> Result<(), StateError>;
    /// The blob `name` (key material shared by replicas); made by `create` and stored when there is none yet.
    /// Racing creators all get the one value stored first.
    fn blob_or_create(
        &self,
        name: &str,
        create: &mut dyn FnMut() -> Result<Vec<u8>, StateError>,
    ) -> Result<Vec<u8>, StateError>;
    /// Replaces the blob `name` with `value` if it still holds `expected` (a CA rotation step); `false` when it
    /// changed meanwhile.
    fn replace_blob(&self, name: &str, expected: &[u8], value: &[u8]) -> Result<bool, StateError>;
    /// Stores a record of Ferry's own bookkeeping that is no resource (an open multipart upload to abort if
    /// its backup never finishes), replacing one under the same key.
    fn put_record(&self, key: &str, value: &[u8]) -> Result<(), StateError>;
    /// Removes a record; absent is fine.
    fn delete_record(&self, key: &str) -> Result<(), StateError>;
    /// Records whose key starts with `prefix`, by key.
    fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError>;
    /// A number that changes whenever a resource of type `rt` is written or deleted through this store, so a
    /// reader polling a type (the scheduler, every second) decodes it again only after a change. `None`: the
    /// store cannot tell, read every time.
    fn generation(&self, _rt: ResourceType) -> Option<u64> {
        None
    }
    /// `Ok` while the store can write, else why not. While it cannot, each call retries (rate-limited)
    /// whatever brings it back, so calling it periodically is enough to recover.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// `Err(NotLeader)` once this replica's term is over (a fenced store: its election key is gone or was
    /// re-created); `Ok` for a store without replicas. For effects outside the state store (completing an
    /// upload, deleting backups) that a deposed leader must not make.
    fn still_leading(&self) -> Result<(), StateError> {
        Ok(())
    }
}

/// The key of a resource record.
fn key(rt: ResourceType, id: &str) -> String {
    format!("{}/{id}", rt.full_name())
}

/// The prefix of the label index entries of type `rt` and label `label=value`. NUL separates the parts, so
/// one label's entries never run into another's (readers still check the labels of what they find).
fn index_prefix(rt: ResourceType, label: &str, value: &str) -> String {
    format!("{}\0{label}\0{value}\0", rt.full_name())
}

/// The label index entries of `r`: one per label, each ending in the resource's id.
fn index_entries(r: &Resource) -> BTreeSet<String> {
    let rt = r.resource_type();
    r.metadata.labels.iter().map(|(k, v)| format!("{}{}", index_prefix(rt, k, v), r.metadata.id)).collect()
}

/// What a write of `new` over `old` changes in the label index: entries to remove, entries to add.
fn index_changes(old: Option<&Resource>, new: Option<&Resource>) -> (Vec<String>, Vec<String>) {
    let (old, new) = (old.map(index_entries).unwrap_or_default(), new.map(index_entries).unwrap_or_default());
    (old.difference(&new).cloned().collect(), new.difference(&old).cloned().collect())
}

/// The id at the end of an index entry under `prefix`.
fn indexed_id<'k>(entry: &'k str, prefix: &str) -> Option<&'k str> {
    entry.strip_prefix(prefix)
}

/// Whether `r` really carries `label=value` (an index entry is only a hint).
fn has_label(r: &Resource, label: &str, value: &str) -> bool {
    r.metadata.labels.get(label).is_some_and(|v| v == value)
}

/// Decodes a resource record stored under `k`.
fn decode(k: &str, v: &[u8]) -> Result<Resource, StateError> {
    let mut r: Resource =
        serde_json::from_slice(v).map_err(|error| StateError::Corrupt { key: k.to_string(), error })?;
    // Records written before the namespaces followed the seed's carry the old one; the type decides.
    r.metadata.namespace = r.resource_type().namespace().to_owned();
    Ok(r)
}

/// Stamps `r` for storing over `old`: the next version, the original creation time, updated now.
fn stamp(mut r: Resource, old: Option<Resource>) -> Result<(Resource, Vec<u8>), StateError> {
    let now = Timestamp::now();
    r.metadata.version = old.as_ref().map_or(1, |o| o.metadata.version + 1);
    r.metadata.created = old.and_then(|o| o.metadata.created).or(Some(now));
    r.metadata.updated = Some(now);
    let bytes = serde_json::to_vec(&r).map_err(StateError::Encode)?;
    Ok((r, bytes))
}
