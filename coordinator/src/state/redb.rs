//! The embedded state store: one redb file in the state dir.

use std::path::Path;

use ferry_common::resources::{Resource, ResourceType};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{decode, key, stamp, StateError, StateStore, StateTxn};

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

/// The embedded store: one redb file in the state dir. Records are JSON so the format can grow fields.
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(RESOURCES)?;
        tx.open_table(BLOBS)?;
        tx.commit()?;
        Ok(Self { db })
    }
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

fn put_in(table: &mut redb::Table<'_, &'static str, &'static [u8]>, r: Resource) -> Result<Resource, StateError> {
    let k = key(r.resource_type(), &r.metadata.id);
    let old = table.get(k.as_str())?.map(|v| decode(&k, v.value())).transpose()?;
    let (r, bytes) = stamp(r, old)?;
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

    fn blob_or_create(
        &self,
        name: &str,
        create: &mut dyn FnMut() -> Result<Vec<u8>, StateError>,
    ) -> Result<Vec<u8>, StateError> {
        let tx = self.db.begin_write()?;
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
    }
}
