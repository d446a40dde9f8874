//! The shared state store: resources and blobs as keys under a prefix of an external etcd, so several
//! coordinator replicas work on one state.
//!
//! Layout under the prefix: `resources/<type>/<id>` (the JSON record, as in redb), `index/<entry>` (the label
//! index, written in the same transactions), `blobs/<name>`, `records/<key>` (bookkeeping such as open
//! multipart uploads), `meta/label-index` (set once the index covers
//! every record), and the leader election's keys under `leader` (see the `leader` module).
//!
//! Fencing: once this replica has been elected, every write carries one more comparison — the term's election
//! key still exists with the revision it was created at ([`EtcdStore::fence`]). A deposed leader (lease
//! expired while it was cut off, a new leader elected) therefore cannot write anything, however late its
//! writes arrive; they fail with [`StateError::NotLeader`].
//!
//! A [`StateStore::transact`] is optimistic: it reads through etcd, remembering each key's mod revision
//! (0 for an absent key), buffers its writes, and commits them in one etcd transaction that succeeds only if
//! none of the keys it read changed meanwhile; otherwise it runs again on fresh reads. A record is therefore
//! never written from a stale read, whichever replica or task writes it.
//!
//! The trait is synchronous (redb is); the etcd client is async. Calls run on a small runtime of the store's
//! own and the calling thread waits for the answer, bounded by [`RPC_TIMEOUT`] — like a redb commit waiting
//! for its fsync.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
};
use ferry_common::resources::{Resource, ResourceType};

use super::{
    decode, has_label, index_changes, index_entries, index_prefix, indexed_id, key, stamp, StateError, StateStore,
    StateTxn,
};

/// How long one etcd request may take before the state operation fails.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of a transaction that keeps meeting concurrent writers; each conflict means another writer
/// succeeded, so running out takes sustained contention on the same records.
const MAX_ATTEMPTS: u32 = 64;
/// Index entries written per transaction while building the index (etcd's `--max-txn-ops` defaults to 128).
const INDEX_BUILD_BATCH: usize = 100;

/// Where the state etcd is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct EtcdStoreOptions {
    /// Client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Key prefix every key of this coordinator set lives under (e.g. `/ferry/`).
    pub prefix: String,
    /// CA that signs etcd's serving certificate.
    pub cacert: Option<PathBuf>,
    /// Client certificate and key for etcd's client-certificate authentication.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdStoreOptions {
    /// The etcd client options these settings ask for (TLS files are read here), with `request_timeout` on
    /// every request when given (not for the election: a campaign waits as long as another replica leads).
    pub fn connect_options(&self, request_timeout: Option<Duration>) -> Result<ConnectOptions, StateError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(RPC_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(t) = request_timeout {
            opts = opts.with_timeout(t);
        }
        let read = |p: &PathBuf, flag: &str| {
            std::fs::read(p).map_err(|e| StateError::Etcd(format!("read {flag} {}: {e}", p.display())))
        };
        if self.cacert.is_some() || self.cert.is_some() || self.key.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = &self.cacert {
                t = t.ca_certificate(Certificate::from_pem(read(ca, "--state-etcd-cacert")?));
            }
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => {
                    t = t.identity(Identity::from_pem(read(c, "--state-etcd-cert")?, read(k, "--state-etcd-key")?));
                }
                (None, None) => {}
                _ => {
                    return Err(StateError::Etcd(
                        "--state-etcd-cert and --state-etcd-key go together; give both or neither".into(),
                    ))
                }
            }
            opts = opts.with_tls(t);
        }
        Ok(opts)
    }
}

/// The etcd-backed store.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// The election key of this replica's latest term and the revision it was created at; every write is
    /// conditional on it once set (never cleared: a replica that lost its term writes nothing).
    fence: Mutex<Option<(String, i64)>>,
    /// The runtime the etcd client's connections live on; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async context; this does not wait.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `rt` and waits for it on this thread, at most [`RPC_TIMEOUT`] per call.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, StateError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(tokio::time::timeout(RPC_TIMEOUT, fut).await);
    });
    match rx.recv() {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(StateError::Etcd(format!("{what}: {e}"))),
        Ok(Err(_)) => Err(StateError::Etcd(format!("{what}: no answer within {}s", RPC_TIMEOUT.as_secs()))),
        Err(_) => Err(StateError::Etcd(format!("{what}: the etcd client stopped"))),
    }
}

impl EtcdStore {
    /// Connects (lazily: etcd may still be starting) and checks that the cluster answers.
    pub fn connect(options: &EtcdStoreOptions) -> Result<Self, StateError> {
        if options.endpoints.is_empty() {
            return Err(StateError::Etcd("--state-etcd-endpoints names no endpoint".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("state-etcd")
            .enable_all()
            .build()
            .map_err(|e| StateError::Etcd(format!("start the etcd client runtime: {e}")))?;
        let opts = options.connect_options(Some(RPC_TIMEOUT))?;
        let endpoints = options.endpoints.clone();
        let client = run_on(&runtime, "connect", async move { Client::connect(endpoints, Some(opts)).await })?;
        let store = Self { client, prefix: options.prefix.clone(), fence: Mutex::new(None), runtime: Some(runtime) };
        // One read proves the endpoints, TLS and permissions now rather than at the first write.
        store.get_raw(format!("{}blobs/", store.prefix))?;
        store.build_index()?;
        Ok(store)
    }

    /// Fences every later write on this term's election key (`key`, created at `revision`).
    pub fn fence(&self, key: String, revision: i64) {
        *crate::lock(&self.fence) = Some((key, revision));
    }

    /// The comparison that guards writes, once this replica has led.
    fn fence_compare(&self) -> Option<Compare> {
        crate::lock(&self.fence).as_ref().map(|(k, rev)| Compare::create_revision(k.as_str(), CompareOp::Equal, *rev))
    }

    /// After a failed conditional write: `NotLeader` if the failure was the fence (the term is over).
    fn check_fence(&self) -> Result<(), StateError> {
        let Some((k, rev)) = crate::lock(&self.fence).clone() else { return Ok(()) };
        let mut c = self.client.clone();
        let key = k.clone();
        let created = run_on(self.rt(), "read the leader key", async move {
            Ok(c.get(key, None).await?.take_kvs().first().map(|kv| kv.create_revision()))
        })?;
        if created == Some(rev) {
            Ok(())
        } else {
            Err(StateError::NotLeader)
        }
    }

    /// Builds the label index for records written before it existed (once per state; idempotent if replicas
    /// race).
    fn build_index(&self) -> Result<(), StateError> {
        let marker = format!("{}meta/label-index", self.prefix);
        if self.get_raw(marker.clone())?.0.is_some() {
            return Ok(());
        }
        let prefix = format!("{}resources/", self.prefix);
        let mut c = self.client.clone();
        let kvs = run_on(self.rt(), "list resources to index", async move {
            Ok(c.get(prefix, Some(GetOptions::new().with_prefix())).await?.take_kvs())
        })?;
        let mut entries = Vec::new();
        for kv in &kvs {
            entries.extend(index_entries(&decode(&String::from_utf8_lossy(kv.key()), kv.value())?));
        }
        for chunk in entries.chunks(INDEX_BUILD_BATCH) {
            let ops: Vec<TxnOp> = chunk.iter().map(|e| TxnOp::put(self.index_key(e), Vec::new(), None)).collect();
            let mut c = self.client.clone();
            run_on(self.rt(), "write the label index", async move { c.txn(Txn::new().and_then(ops)).await })?;
        }
        let mut c = self.client.clone();
        run_on(self.rt(), "mark the label index built", async move { c.put(marker, "1", None).await })?;
        Ok(())
    }

    fn index_key(&self, entry: &str) -> String {
        format!("{}index/{entry}", self.prefix)
    }

    /// The client, for the leader election on the same etcd.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The key prefix of this coordinator set.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        // Invariant: `runtime` is only taken in `drop`.
        self.runtime.as_ref().expect("the runtime lives as long as the store")
    }

    fn resource_key(&self, rt: ResourceType, id: &str) -> String {
        format!("{}resources/{}", self.prefix, key(rt, id))
    }

    /// The value and mod revision of `k` (revision 0: absent).
    pub(super) fn get_raw(&self, k: String) -> Result<(Option<Vec<u8>>, i64), StateError> {
        let mut c = self.client.clone();
        let what = format!("get {k}");
        run_on(self.rt(), &what, async move {
            let mut resp = c.get(k, None).await?;
            Ok(match resp.take_kvs().into_iter().next() {
                Some(kv) => {
                    let rev = kv.mod_revision();
                    let (_, v) = kv.into_key_value();
                    (Some(v), rev)
                }
                None => (None, 0),
            })
        })
    }

    /// Commits `writes` (`None`: delete) if every key in `reads` still has the mod revision read and the fence
    /// holds; `false` on a conflict, [`StateError::NotLeader`] when the fence failed.
    fn commit(
        &self,
        reads: &HashMap<String, i64>,
        writes: &BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<bool, StateError> {
        let mut compares: Vec<Compare> =
            reads.iter().map(|(k, rev)| Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev)).collect();
        compares.extend(self.fence_compare());
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k.as_str(), v.clone(), None),
                None => TxnOp::delete(k.as_str(), None),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let mut c = self.client.clone();
        let ok = run_on(self.rt(), "commit a transaction", async move { Ok(c.txn(txn).await?.succeeded()) })?;
        if !ok {
            self.check_fence()?;
        }
        Ok(ok)
    }

    /// Buffers the write of `new` over `old` under `k` (`None`: delete) with its label index changes.
    fn stage(
        &self,
        writes: &mut BTreeMap<String, Option<Vec<u8>>>,
        k: String,
        old: Option<&Resource>,
        new: Option<(&Resource, Vec<u8>)>,
    ) {
        let (remove, add) = index_changes(old, new.as_ref().map(|(r, _)| *r));
        for e in remove {
            writes.insert(self.index_key(&e), None);
        }
        for e in add {
            writes.insert(self.index_key(&e), Some(Vec::new()));
        }
        writes.insert(k, new.map(|(_, bytes)| bytes));
    }
}

/// One attempt of a transaction: reads remembered with their revisions, writes buffered.
struct EtcdTxn<'s> {
    store: &'s EtcdStore,
    reads: HashMap<String, i64>,
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl EtcdTxn<'_> {
    fn read(&mut self, k: &str) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(v) = self.writes.get(k) {
            return Ok(v.clone());
        }
        let (v, rev) = self.store.get_raw(k.to_string())?;
        // A key read twice must not have changed between the reads either: keep the first revision.
        self.reads.entry(k.to_string()).or_insert(rev);
        Ok(v)
    }
}

impl StateTxn for EtcdTxn<'_> {
    fn get(&mut self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError> {
        let k = self.store.resource_key(rt, id);
        self.read(&k)?.map(|v| decode(&k, &v)).transpose()
    }

    fn put(&mut self, r: Resource) -> Result<Resource, StateError> {
        let k = self.store.resource_key(r.resource_type(), &r.metadata.id);
        let old = self.read(&k)?.map(|v| decode(&k, &v)).transpose()?;
        let (r, bytes) = stamp(r, old.clone())?;
        self.store.stage(&mut self.writes, k, old.as_ref(), Some((&r, bytes)));
        Ok(r)
    }
}

impl StateStore for EtcdStore {
    fn get(&self, rt: ResourceType, id: &str) -> Result<Option<Resource>, StateError> {
        let k = self.resource_key(rt, id);
        self.get_raw(k.clone())?.0.map(|v| decode(&k, &v)).transpose()
    }

    fn list(&self, rt: ResourceType) -> Result<Vec<Resource>, StateError> {
        let prefix = format!("{}resources/{}/", self.prefix, rt.full_name());
        let mut c = self.client.clone();
        let what = format!("list {prefix}");
        let kvs = run_on(self.rt(), &what, async move {
            Ok(c.get(prefix, Some(GetOptions::new().with_prefix())).await?.take_kvs())
        })?;
        kvs.iter().map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value())).collect()
    }

    fn list_labeled(&self, rt: ResourceType, label: &str, value: &str) -> Result<Vec<Resource>, StateError> {
        let prefix = index_prefix(rt, label, value);
        let full = self.index_key(&prefix);
        let mut c = self.client.clone();
        let entries = run_on(self.rt(), "read the label index", async move {
            Ok(c.get(full, Some(GetOptions::new().with_prefix().with_keys_only())).await?.take_kvs())
        })?;
        let mut out = Vec::new();
        let index_root = self.index_key("");
        for kv in &entries {
            let entry = String::from_utf8_lossy(kv.key());
            let Some(id) = entry.strip_prefix(&index_root).and_then(|e| indexed_id(e, &prefix)) else { continue };
            if let Some(r) = self.get(rt, id)?.filter(|r| has_label(r, label, value)) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn put(&self, r: Resource) -> Result<Resource, StateError> {
        let mut stored = None;
        self.transact(&mut |tx| {
            stored = Some(tx.put(r.clone())?);
            Ok(())
        })?;
        // Invariant: a successful transaction ran the closure, which set `stored`.
        Ok(stored.expect("the transaction stored the resource"))
    }

    fn delete(&self, rt: ResourceType, id: &str) -> Result<bool, StateError> {
        let k = self.resource_key(rt, id);
        for _ in 0..MAX_ATTEMPTS {
            let (v, rev) = self.get_raw(k.clone())?;
            let Some(v) = v else { return Ok(false) };
            let old = decode(&k, &v)?;
            let mut writes = BTreeMap::new();
            self.stage(&mut writes, k.clone(), Some(&old), None);
            if self.commit(&HashMap::from([(k.clone(), rev)]), &writes)? {
                return Ok(true);
            }
        }
        Err(StateError::Conflict(MAX_ATTEMPTS))
    }

    fn transact(&self, f: &mut dyn FnMut(&mut dyn StateTxn) -> Result<(), StateError>) -> Result<(), StateError> {
        for attempt in 0..MAX_ATTEMPTS {
            let mut txn = EtcdTxn { store: self, reads: HashMap::new(), writes: BTreeMap::new() };
            f(&mut txn)?;
            if txn.writes.is_empty() || self.commit(&txn.reads, &txn.writes)? {
                return Ok(());
            }
            // Another writer won: back off a little (more with each conflict) and read again.
            std::thread::sleep(Duration::from_millis(u64::from(attempt.min(10)) * rand::random_range(1..5)));
        }
        Err(StateError::Conflict(MAX_ATTEMPTS))
    }

    fn still_leading(&self) -> Result<(), StateError> {
        let Some(fence) = self.fence_compare() else { return Ok(()) };
        let txn = Txn::new().when([fence]);
        let mut c = self.client.clone();
        let holds = run_on(self.rt(), "check the leader's term", async move { Ok(c.txn(txn).await?.succeeded()) })?;
        if holds {
            Ok(())
        } else {
            Err(StateError::NotLeader)
        }
    }

    fn put_record(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        let writes = BTreeMap::from([(format!("{}records/{key}", self.prefix), Some(value.to_vec()))]);
        self.commit(&HashMap::new(), &writes).map(drop)
    }

    fn delete_record(&self, key: &str) -> Result<(), StateError> {
        let writes = BTreeMap::from([(format!("{}records/{key}", self.prefix), None)]);
        self.commit(&HashMap::new(), &writes).map(drop)
    }

    fn list_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let root = format!("{}records/", self.prefix);
        let full = format!("{root}{prefix}");
        let mut c = self.client.clone();
        let kvs = run_on(self.rt(), "list records", async move {
            Ok(c.get(full, Some(GetOptions::new().with_prefix())).await?.take_kvs())
        })?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.into_key_value();
                let k = String::from_utf8(k).ok()?;
                Some((k.strip_prefix(&root)?.to_string(), v))
            })
            .collect())
    }

    fn blob_or_create(
        &self,
        name: &str,
        create: &mut dyn FnMut() -> Result<Vec<u8>, StateError>,
    ) -> Result<Vec<u8>, StateError> {
        let k = format!("{}blobs/{name}", self.prefix);
        if let (Some(v), _) = self.get_raw(k.clone())? {
            return Ok(v);
        }
        let value = create()?;
        // Put only if still absent; otherwise read what the replica that won stored.
        let mut compares = vec![Compare::create_revision(k.as_str(), CompareOp::Equal, 0)];
        compares.extend(self.fence_compare());
        let txn = Txn::new().when(compares).and_then([TxnOp::put(k.as_str(), value.clone(), None)]);
        let mut c = self.client.clone();
        let created = run_on(self.rt(), "create a blob", async move { Ok(c.txn(txn).await?.succeeded()) })?;
        if created {
            return Ok(value);
        }
        self.check_fence()?;
        self.get_raw(k.clone())?.0.ok_or_else(|| StateError::Etcd(format!("{k} vanished right after it was created")))
    }

    fn replace_blob(&self, name: &str, expected: &[u8], value: &[u8]) -> Result<bool, StateError> {
        let k = format!("{}blobs/{name}", self.prefix);
        let mut compares = vec![Compare::value(k.as_str(), CompareOp::Equal, expected.to_vec())];
        compares.extend(self.fence_compare());
        let txn = Txn::new().when(compares).and_then([TxnOp::put(k.as_str(), value.to_vec(), None)]);
        let mut c = self.client.clone();
        let replaced = run_on(self.rt(), "replace a blob", async move { Ok(c.txn(txn).await?.succeeded()) })?;
        if !replaced {
            self.check_fence()?;
        }
        Ok(replaced)
    }
}
