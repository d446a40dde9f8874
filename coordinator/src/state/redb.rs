//! The embedded state store: one redb file in the state dir.
//!
//! redb refuses every call after one I/O error ("Previous I/O error") until the database is reopened, so a
//! single ENOSPC would poison the coordinator for good. Here an I/O failure drops the database and marks
//! the store unwritable; the next call (at most once a second) reopens it — redb repairs the file from its
//! last durable commit, so no committed record is lost — and the next successful write clears the mark.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_common::resources::{Resource, ResourceType, Timestamp};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    decode, has_label, index_changes, index_entries, index_prefix, indexed_id, key, stamp, StateError, StateStore,
    StateTxn,
};

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for StateError { #[allow(clippy::useless_conversion)] fn from(e: $t) -> Self { Self::Db(e.into()) } })*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// The label index ([`super::index_entries`]): entries only, no values.
const INDEX: TableDefinition<&str, ()> = TableDefinition::new("label-index");
/// [`StateStore::put_record`]'s records.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Format markers: `label-index` once the index covers every record (databases from before it get it built at
/// open).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Where [`StateStore::health`] proves that writes work again; nothing reads it.
const PROBE: TableDefinition<&str, u64> = TableDefinition::new("probe");
/// How often a store that cannot write tries to reopen or probe: often enough to recover quickly, rarely
/// enough that a full disk is not hammered.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The embedded store: one redb file in the state dir. Records are JSON so the format can grow fields.
pub struct RedbStore {
    path: PathBuf,
    /// `None` after an I/O failure until it is reopened.
    db: RwLock<Option<Arc<redb::Database>>>,
    /// Why the store cannot write, while it cannot.
    failure: Mutex<Option<Failure>>,
    /// Writes so far, per resource type ([`StateStore::generation`]).
    generations: Mutex<std::collections::HashMap<String, u64>>,
}

struct Failure {
    error: String,
    last_try: Instant,
}

fn open_db(path: &Path) -> Result<redb::Database, StateError> {
    let db = redb::Database::create(path)?;
    let tx = db.begin_write()?;
    tx.open_table(RESOURCES)?;
    tx.open_table(BLOBS)?;
    tx.open_table(RECORDS)?;
    {
        let mut meta = tx.open_table(META)?;
        if meta.get("label-index")?.is_none() {
            let resources = tx.open_table(RESOURCES)?;
            let mut index = tx.open_table(INDEX)?;
            for item in resources.iter()? {
                let (k, v) = item?;
                for entry in index_entries(&decode(k.value(), v.value())?) {
                    index.insert(entry.as_str(), ())?;
                }
            }
            meta.insert("label-index", 1)?;
        }
    }
    tx.commit()?;
    Ok(db)
}

/// Whether `e` means the database must be reopened (redb fails every later call after an I/O error).
fn needs_reopen(e: &StateError) -> bool {
    matches!(e, StateError::Db(redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed))
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = open_db(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            failure: Mutex::new(None),
            generations: Mutex::new(Default::default()),
        })
    }

    /// Counts a write to `rt` (bumped before and after a write, so a reader never caches a half-seen one).
    fn bump(&self, rt: ResourceType) {
        *crate::lock(&self.generations).entry(rt.full_name()).or_default() += 1;
    }

    /// The open database, reopening it after a failure (at most once per [`RETRY_EVERY`]).
    fn db(&self) -> Result<Arc<redb::Database>, StateError> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        {
            let mut failure = crate::lock(&self.failure);
            if let Some(f) = failure.as_mut() {
                if f.last_try.elapsed() < RETRY_EVERY {
                    return Err(StateError::Unavailable(f.error.clone()));
                }
                f.last_try = Instant::now();
            }
        }
        match open_db(&self.path) {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), "reopened the state store after an I/O failure");
                let db = Arc::new(db);
                *slot = Some(db.clone());
                Ok(db)
            }
            Err(e) => {
                self.record(&e);
                Err(e)
            }
        }
    }

    fn record(&self, e: &StateError) {
        let mut failure = crate::lock(&self.failure);
        if failure.is_none() {
            tracing::error!(path = %self.path.display(), "the state store cannot write: {e}");
        }
        *failure = Some(Failure { error: e.to_string(), last_try: Instant::now() });
    }

    /// Runs `op` on the database. An I/O failure marks the store unwritable and drops the database, to be
    /// reopened by a later call; a successful write clears the mark.
    fn run<T>(&self, write: bool, op: impl FnOnce(&redb::Database) -> Result<T, StateError>) -> Result<T, StateError> {
        let db = self.db()?;
        match op(&db) {
            Ok(v) => {
                if write && crate::lock(&self.failure).take().is_some() {
                    tracing::info!(path = %self.path.display(), "the state store writes again");
                }
                Ok(v)
            }
            Err(e) => {
                if needs_reopen(&e) {
                    self.record(&e);
                    let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
                    if slot.as_ref().is_some_and(|d| Arc::ptr_eq(d, &db)) {
                        *slot = None;
                    }
                }
                Err(e)
            }
        }
    }
}

/// The tables a resource write touches.
struct Tables<'t> {
    resources: redb::Table<'t, &'static str, &'static [u8]>,
    index: redb::Table<'t, &'static str, ()>,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t redb::WriteTransaction) -> Result<Self, StateError> {
        Ok(Self { resources: tx.open_table(RESOURCES)?, index: tx.open_table(INDEX)? })
    }

    fn put(&mut self, r: Resource) -> Result<Resource, StateError> {
        let k = key(r.resource_type(), &r.metadata.id);
        let old = self.resources.get(k.as_str())?.map(|v| decode(&k, v.value())).transpose()?;
        let (remove, add) = index_changes(old.as_ref(), Some(&r));
        let (r, bytes) = stamp(r, old)?;
        self.resources.insert(k.as_str(), bytes.as_slice())?;
        self.reindex(&remove, &add)?;
        Ok(r)
    }

    fn delete(&mut self, rt: ResourceType, id: &str) -> Result<bool, StateError> {
        let k = key(rt, id);
        let old = self.resources.remove(k.as_str())?.map(|v| decode(&k, v.value())).transpose()?;
        let (remove, add) = index_changes(old.as_ref(), None);
        self.reindex(&remove, &add)?;
        Ok(old.is_some())
    }

    fn reindex(&mut self, remove: &[String], add: &[String]) -> Result<(), StateError> {
        for e in remove {
            self.index.remove(e.as_str())?;
        }
        for e in add {
            self.index.insert(e.as_str(), ())?;
        }
        Ok(())
    }
}

/// Reads and writes of one redb write transaction.
struct RedbTxn<'t> {
    tables: Tables<'t>,
    /// Types written, for [`RedbStore::bump`].
    written: Vec<ResourceType>,
}

impl StateTxn for RedbTxn<'_> {
    fn get(&mut self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError> {
        let k = key(rt, id);
        let v = self.tables.resources.get(k.as_str())?;
        v.map(|v| decode(&k, v.value())).transpose()
    }

    fn put(&mut self, r: Resource) -> Result<Resource, StateError> {
        self.written.push(r.resource_type());
        self.tables.put(r)
    }
}

impl StateStore for RedbStore {
    fn get(&self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError> {
        self.run(false, |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(RESOURCES)?;
            let k = key(rt, id);
            let v = table.get(k.as_str())?;
            v.map(|v| decode(&k, v.value())).transpose()
        })
    }

    fn list(&self, rt: ResourceType) -> Result<Vec<Resource>, StateError> {
        self.run(false, |db| list_in(db, rt))
    }

    fn list_labeled(&self, rt: ResourceType, label: &str, value: &str) -> Result<Vec<Resource>, StateError> {
        self.run(false, |db| {
            let tx = db.begin_read()?;
            let (resources, index) = (tx.open_table(RESOURCES)?, tx.open_table(INDEX)?);
            let prefix = index_prefix(rt, label, value);
            // The prefix ends in NUL: every entry under it sorts below the same text ending in \x01.
            let end = format!("{}\u{1}", &prefix[..prefix.len() - 1]);
            let mut out = Vec::new();
            for item in index.range(prefix.as_str()..end.as_str())? {
                let (entry, _) = item?;
                let Some(id) = indexed_id(entry.value(), &prefix) else { continue };
                let k = key(rt, id);
                if let Some(v) = resources.get(k.as_str())? {
                    let r = decode(&k, v.value())?;
                    if has_label(&r, label, value) {
                        out.push(r);
                    }
                }
            }
            Ok(out)
        })
    }

    fn put(&self, r: Resource) -> Result<Resource, StateError> {
        let rt = r.resource_type();
        self.bump(rt);
        let stored = self.run(true, |db| {
            let tx = db.begin_write()?;
            let stored = Tables::open(&tx)?.put(r)?;
            tx.commit()?;
            Ok(stored)
        });
        self.bump(rt);
        stored
    }

    fn transact(&self, f: &mut dyn FnMut(&mut dyn StateTxn) -> Result<(), StateError>) -> Result<(), StateError> {
        let mut written = Vec::new();
        let r = self.run(true, |db| {
            let tx = db.begin_write()?;
            {
                let mut txn = RedbTxn { tables: Tables::open(&tx)?, written: Vec::new() };
                // Dropping `tx` uncommitted on error aborts it.
                let r = f(&mut txn);
                written = std::mem::take(&mut txn.written);
                r?;
            }
            tx.commit()?;
            Ok(())
        });
        for rt in written {
            self.bump(rt);
        }
        r
    }

    fn generation(&self, rt: ResourceType) -> Option<u64> {
        Some(crate::lock(&self.generations).get(&rt.full_name()).copied().unwrap_or(0))
    }

    fn delete(&self, rt: ResourceType, id: &str) -> Result<bool, StateError> {
        self.bump(rt);
        let _bump_after = BumpOnDrop(self, rt);
        self.run(true, |db| {
            let tx = db.begin_write()?;
            let existed = Tables::open(&tx)?.delete(rt, id)?;
            tx.commit()?;
            Ok(existed)
        })
    }

    fn blob_or_create(
        &self,
        name: &str,
        create: &mut dyn FnMut() -> Result<Vec<u8>, StateError>,
    ) -> Result<Vec<u8>, StateError> {
        self.run(true, |db| {
            let tx = db.begin_write()?;
            let value = {
                let mut table = tx.open_table(BLOBS)?;
                let existing = table.get(name)?.map(|v| v.value().to_vec());
                match existing {
                    Some(v) => v,
                    None => {
                        let v = create()?;
                        table.insert(name, v.as_slice())?;
                        v
                    }
                }
            };
            tx.commit()?;
            Ok(value)
        })
    }

    fn replace_blob(&self, name: &str, expected: &[u8], value: &[u8]) -> Result<bool, StateError> {
        self.run(true, |db| {
            let tx = db.begin_write()?;
            let replaced = {
                let mut table = tx.open_table(BLOBS)?;
                let same = table.get(name)?.is_some_and(|v| v.value() == expected);
                if same {
                    table.insert(name, value)?;
                }
                same
            };
            tx.commit()?;
            Ok(replaced)
        })
    }

    fn put_record(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.run(true, |db| {
            let tx = db.begin_write()?;
            tx.open_table(RECORDS)?.insert(key, value)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_record(&self, key: &str) -> Result<(), StateError> {
        self.run(true, |db| {
            let tx = db.begin_write()?;
            tx.open_table(RECORDS)?.remove(key)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        self.run(false, |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(RECORDS)?;
            let mut out = Vec::new();
            for item in table.range(prefix..)? {
                let (k, v) = item?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn health(&self) -> Result<(), String> {
        let Some(why) = crate::lock(&self.failure).as_ref().map(|f| (f.error.clone(), f.last_try)) else {
            return Ok(());
        };
        if why.1.elapsed() < RETRY_EVERY {
            return Err(format!("the state store cannot write: {}", why.0));
        }
        // A durable write that no reader sees proves the store writes again.
        let probe = self.run(true, |db| {
            let tx = db.begin_write()?;
            tx.open_table(PROBE)?.insert("probe", Timestamp::now().seconds as u64)?;
            tx.commit()?;
            Ok(())
        });
        probe.map_err(|e| {
            if let Some(f) = crate::lock(&self.failure).as_mut() {
                f.last_try = Instant::now();
            }
            format!("the state store cannot write: {e}")
        })
    }
}

fn list_in(db: &redb::Database, rt: ResourceType) -> Result<Vec<Resource>, StateError> {
    let tx = db.begin_read()?;
    let table = tx.open_table(RESOURCES)?;
    let start = format!("{}/", rt.full_name());
    let end = format!("{}0", rt.full_name()); // '0' sorts right after '/'
    let mut out = Vec::new();
    for item in table.range(start.as_str()..end.as_str())? {
        let (k, v) = item?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

/// Bumps a type's generation when dropped: after the write, whatever its outcome.
struct BumpOnDrop<'s>(&'s RedbStore, ResourceType);

impl Drop for BumpOnDrop<'_> {
    fn drop(&mut self) {
        self.0.bump(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::resources::{ClusterSpec, Spec};

    /// The scheduler re-reads the clusters only when their generation moved: it must move on every write of
    /// a cluster, and only then.
    #[test]
    fn a_types_generation_moves_with_its_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("state.redb")).unwrap();
        let g = || s.generation(ResourceType::Cluster).unwrap();
        let g0 = g();
        s.put(Resource::new("a", Spec::Cluster(ClusterSpec::default()))).unwrap();
        let g1 = g();
        assert_ne!(g0, g1);
        s.put(Resource::new("a", Spec::Agent(Default::default()))).unwrap();
        s.list(ResourceType::Cluster).unwrap();
        assert_eq!(g(), g1, "another type's write and a read leave it alone");
        s.transact(&mut |tx| tx.put(Resource::new("b", Spec::Cluster(ClusterSpec::default()))).map(|_| ())).unwrap();
        let g2 = g();
        assert_ne!(g2, g1);
        s.delete(ResourceType::Cluster, "a").unwrap();
        assert_ne!(g(), g2);
    }

    /// A database from before the label index gets it built when opened.
    #[test]
    fn an_older_database_gets_its_label_index_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(RESOURCES).unwrap();
                let mut r = Resource::new("c1/m1", Spec::Agent(Default::default()));
                r.metadata.labels.insert(ferry_common::resources::LABEL_CLUSTER.into(), "c1".into());
                let bytes = serde_json::to_vec(&r).unwrap();
                t.insert(key(ResourceType::Agent, "c1/m1").as_str(), bytes.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let found = s.list_labeled(ResourceType::Agent, ferry_common::resources::LABEL_CLUSTER, "c1").unwrap();
        assert_eq!(found.len(), 1);
    }
}
