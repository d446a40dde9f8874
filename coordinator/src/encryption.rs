//! The coordinator's side of encryption at rest: which recipients a cluster's backups are sealed to (the
//! cluster's own setting, else the `EtcdBackupEncryptionConfigs` resource), and — when the operator gave the
//! coordinator an identity (`--identity FILE`) — opening a stored backup so that a restoring agent receives
//! the zstd stream inside and never the identity.

use std::io::Read;

use ferry_common::encryption::{parse_recipients, EncryptionError, Identities};
use ferry_common::resources::{EncryptionSettings, Resource, ResourceType, Spec, ENCRYPTION_CONFIG_ID};
use tokio::sync::mpsc;

use crate::state::{StateError, StateStore};
use crate::store::{ObjectReader, StoreError};

/// The recipients `cluster`'s next backup is sealed to; empty: stored unencrypted.
pub fn recipients_for(state: &dyn StateStore, cluster: &str) -> Result<Vec<String>, StateError> {
    if let Some(Resource { spec: Spec::Cluster(c), .. }) = state.get(ResourceType::Cluster, cluster)? {
        if let Some(e) = c.backupconfiguration.and_then(|b| b.encryption) {
            return Ok(e.recipients);
        }
    }
    match state.get(ResourceType::EtcdBackupEncryptionConfig, ENCRYPTION_CONFIG_ID)? {
        Some(Resource { spec: Spec::EtcdBackupEncryptionConfig(e), .. }) => Ok(e.recipients),
        _ => Ok(Vec::new()),
    }
}

/// Checks recipients as they are applied.
pub fn check_settings(what: &str, e: &EncryptionSettings) -> Result<(), String> {
    parse_recipients(&e.recipients).map(|_| ()).map_err(|err| format!("{what}: {err}"))
}

/// The object's bytes as one blocking `Read` (for age, on a blocking thread).
struct BlockingObject {
    object: ObjectReader,
    buf: Vec<u8>,
    piece: Vec<u8>,
    pos: usize,
    handle: tokio::runtime::Handle,
}

impl Read for BlockingObject {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.piece.len() {
            match self.handle.block_on(self.object.next(&mut self.buf)) {
                Ok(Some(p)) => {
                    self.piece = p;
                    self.pos = 0;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(format!("read the stored object: {e}"))),
            }
        }
        let n = out.len().min(self.piece.len() - self.pos);
        out[..n].copy_from_slice(&self.piece[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Sends each write as one piece on a channel (to the async task writing frames).
struct ChannelWriter(mpsc::Sender<Vec<u8>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(buf.to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the restoring client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens a stored object with the coordinator's identities: returns a channel of plaintext (zstd) pieces,
/// and the task that ends with the outcome (a tampered object fails there, after the pieces before it).
/// Memory stays bounded: age's 64 KiB chunks, a few of them queued.
pub fn open_object(
    identities: Identities,
    object: ObjectReader,
    chunk: usize,
) -> (mpsc::Receiver<Vec<u8>>, tokio::task::JoinHandle<Result<u64, StoreError>>) {
    let (tx, rx) = mpsc::channel(4);
    let handle = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        let input = BlockingObject { object, buf: vec![0u8; chunk], piece: Vec::new(), pos: 0, handle };
        let mut out = std::io::BufWriter::with_capacity(chunk, ChannelWriter(tx));
        let n = identities.open(input, &mut out).map_err(|e| match e {
            EncryptionError::Output(e) => StoreError::Io { what: "send the decrypted backup".into(), error: e },
            e => StoreError::Mismatch(e.to_string()),
        })?;
        std::io::Write::flush(&mut out)
            .map_err(|error| StoreError::Io { what: "send the decrypted backup".into(), error })?;
        Ok(n)
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use ferry_common::resources::{BackupConfiguration, ClusterSpec};

    use super::*;
    use crate::state::RedbStore;

    fn cluster(id: &str, encryption: Option<Vec<String>>) -> Resource {
        let b = BackupConfiguration {
            schedule: "0 * * * *".into(),
            encryption: encryption.map(|recipients| EncryptionSettings { recipients }),
            ..Default::default()
        };
        Resource::new(id, Spec::Cluster(ClusterSpec { backupconfiguration: Some(b), restorefrom: None }))
    }

    #[test]
    fn a_clusters_recipients_override_the_global_ones_and_an_empty_list_turns_encryption_off() {
        let dir = tempfile::tempdir().unwrap();
        let state = RedbStore::open(&dir.path().join("state.redb")).unwrap();
        let (global, own) =
            (ferry_common::encryption::keygen().recipient, ferry_common::encryption::keygen().recipient);
        assert!(recipients_for(&state, "a").unwrap().is_empty(), "nothing configured: unencrypted");
        let config = EncryptionSettings { recipients: vec![global.clone()] };
        state.put(Resource::new(ENCRYPTION_CONFIG_ID, Spec::EtcdBackupEncryptionConfig(config))).unwrap();
        state.put(cluster("a", None)).unwrap();
        state.put(cluster("b", Some(vec![own.clone()]))).unwrap();
        state.put(cluster("c", Some(Vec::new()))).unwrap();
        assert_eq!(recipients_for(&state, "a").unwrap(), [global.as_str()]);
        assert_eq!(recipients_for(&state, "b").unwrap(), [own]);
        assert!(recipients_for(&state, "c").unwrap().is_empty());
        assert_eq!(recipients_for(&state, "unknown").unwrap(), [global]);
        let bad = EncryptionSettings { recipients: vec!["age1xyz".into()] };
        let e = check_settings("spec.recipients", &bad).unwrap_err();
        assert!(e.contains("spec.recipients") && e.contains("not an age X25519 recipient"), "{e}");
        let secret = EncryptionSettings { recipients: vec!["AGE-SECRET-KEY-1XYZ".into()] };
        let e = check_settings("spec.recipients", &secret).unwrap_err();
        assert!(!e.contains("1XYZ"), "a pasted identity is never echoed: {e}");
    }
}
