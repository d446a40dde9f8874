//! The coordinator's state store: resources, kept crash-safe.
//!
//! Behind one small trait so that highly available coordinators can later keep the same resources in an
//! external etcd; the embedded implementation is redb ([`redb`]), whose commits are durable (fsync) before they
//! return, so nothing acknowledged to ferryctl is lost to a restart or `kill -9`.
//!
//! A read-modify-write of resources goes through [`StateStore::transact`]: one write transaction, so two
//! writers (a job's progress tick and a configuration change) cannot overwrite each other's update.
//!
//! A store that cannot write (disk full, I/O errors) says so through [`StateStore::health`], which `/readyz`,
//! the `ferry_state_store_writable` metric and the overall status show, and recovers by itself once the
//! cause is gone.

mod redb;

use ferry_common::resources::{Resource, ResourceType};

pub use self::redb::RedbStore;

/// A state store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database itself failed (I/O, corruption of its pages).
    #[error("state store: {0}")]
    Db(::redb::Error),
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
    /// Stores `r`, returning it as stored (with its new version).
    fn put(&self, r: Resource) -> Result<Resource, StateError>;
    /// Removes a resource; `false` if it did not exist.
    fn delete(&self, rt: ResourceType, id: &str) -> Result<bool, StateError>;
    /// Runs `f` in one write transaction, committed only when `f` succeeds; no other write interleaves.
    fn transact(&self, f: &mut dyn FnMut(&mut dyn StateTxn) -> Result<(), StateError>) -> Result<(), StateError>;
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
}
