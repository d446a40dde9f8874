//! The embedded state store: one redb file in the state dir.

use std::path::Path;

use ferry_common::resources::{Resource, ResourceType, Timestamp};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{StateError, StateStore, StateTxn};

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

fn key(rt: ResourceType, id: &str) -> String {
    format!("{}/{id}", rt.full_name())
}

/// The embedded store: one redb file in the state dir. Records are JSON so the format can grow fields.
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(RESOURCES)?;
        tx.commit()?;
        Ok(Self { db })
    }
}

fn decode(k: &str, v: &[u8]) -> Result<Resource, StateError> {
    let mut r: Resource =
        serde_json::from_slice(v).map_err(|error| StateError::Corrupt { key: k.to_string(), error })?;
    // Records written before the namespaces followed the seed's carry the old one; the type decides.
    r.metadata.namespace = r.resource_type().namespace().to_owned();
    Ok(r)
}

/// Reads and writes of one redb write transaction.
struct RedbTxn<'t> {
    table: redb::Table<'t, &'static str, &'static [u8]>,
}

impl StateTxn for RedbTxn<'_> {
    fn get(&mut self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError> {
        let k = key(rt, id);
        let v = self.table.get(k.as_str())?;
        v.map(|v| decode(&k, v.value())).transpose()
    }

    fn put(&mut self, r: Resource) -> Result<Resource, StateError> {
        put_in(&mut self.table, r)
    }
}

fn put_in(table: &mut redb::Table<'_, &'static str, &'static [u8]>, mut r: Resource) -> Result<Resource, StateError> {
    let k = key(r.resource_type(), &r.metadata.id);
    let old = table.get(k.as_str())?.map(|v| decode(&k, v.value())).transpose()?;
    let now = Timestamp::now();
    r.metadata.version = old.as_ref().map_or(1, |o| o.metadata.version + 1);
    r.metadata.created = old.and_then(|o| o.metadata.created).or(Some(now));
    r.metadata.updated = Some(now);
    let bytes = serde_json::to_vec(&r).map_err(StateError::Encode)?;
    table.insert(k.as_str(), bytes.as_slice())?;
    Ok(r)
}

impl StateStore for RedbStore {
    fn get(&self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RESOURCES)?;
        let k = key(rt, id);
        let v = table.get(k.as_str())?;
        v.map(|v| decode(&k, v.value())).transpose()
    }

    fn list(&self, rt: ResourceType) -> Result<Vec<Resource>, StateError> {
        let tx = self.db.begin_read()?;
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

    fn put(&self, r: Resource) -> Result<Resource, StateError> {
        let tx = self.db.begin_write()?;
        let stored = put_in(&mut tx.open_table(RESOURCES)?, r)?;
        tx.commit()?;
        Ok(stored)
    }

    fn transact(&self, f: &mut dyn FnMut(&mut dyn StateTxn) -> Result<(), StateError>) -> Result<(), StateError> {
        let tx = self.db.begin_write()?;
        {
            let mut txn = RedbTxn { table: tx.open_table(RESOURCES)? };
            // Dropping `tx` uncommitted on error aborts it.
            f(&mut txn)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn delete(&self, rt: ResourceType, id: &str) -> Result<bool, StateError> {
        let tx = self.db.begin_write()?;
        let existed = {
            let mut table = tx.open_table(RESOURCES)?;
            let removed = table.remove(key(rt, id).as_str())?;
            removed.is_some()
        };
        tx.commit()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::resources::{ClusterSpec, Spec};

    #[test]
    fn resources_persist_across_reopen_with_versions() {
        let dir = std::env::temp_dir().join(format!("ferry-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            let r = s.put(Resource::new("a", Spec::Cluster(ClusterSpec::default()))).unwrap();
            assert_eq!(r.metadata.version, 1);
            let r = s.put(r).unwrap();
            assert_eq!(r.metadata.version, 2);
            s.put(Resource::new("b", Spec::Cluster(ClusterSpec::default()))).unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let all = s.list(ResourceType::Cluster).unwrap();
        assert_eq!(all.iter().map(|r| r.metadata.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(s.list(ResourceType::Agent).unwrap().is_empty());
        assert!(s.delete(ResourceType::Cluster, "a").unwrap());
        assert!(!s.delete(ResourceType::Cluster, "a").unwrap());
        assert!(s.get(ResourceType::Cluster, "a").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
