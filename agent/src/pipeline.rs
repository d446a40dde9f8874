//! The snapshot pipeline's pure parts: checking etcd's trailing hash and compressing.
//!
//! etcd's snapshot stream is the bbolt database in chunks, then one last message holding the sha256 of every
//! byte before it. A data message can itself report `remaining_bytes == 0`, so the last message is found by
//! the end of the stream: [`SnapshotVerifier`] holds one message back until it knows another follows.

use std::io::Write;

use sha2::{Digest, Sha256};

/// etcd's snapshot did not check out.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("etcd's snapshot stream was empty")]
    Empty,
    #[error("etcd's snapshot stream ended without its 32-byte trailing sha256 (last message was {0} bytes); the snapshot is incomplete")]
    NoTrailingHash(usize),
    #[error("etcd's trailing sha256 {expected} does not match the {bytes} snapshot bytes received (sha256 {actual}); the snapshot is corrupt")]
    Mismatch { expected: String, actual: String, bytes: u64 },
}

/// Feeds etcd's messages through sha256, holding back the last one.
#[derive(Default)]
pub struct SnapshotVerifier {
    /// One hash state: the database's digest, and the whole file's as a clone of it plus the trailer.
    db: Sha256,
    held: Option<Vec<u8>>,
    db_bytes: u64,
}

/// A verified snapshot: the trailing hash message and digests of what was streamed.
#[derive(Debug)]
pub struct Verified {
    /// The trailing hash message itself; it is part of the snapshot file (`etcdctl snapshot restore` checks it).
    pub trailer: Vec<u8>,
    /// Size of the whole snapshot file: database plus trailer.
    pub file_bytes: u64,
    /// sha256 of the whole snapshot file.
    pub file_sha256: [u8; 32],
}

impl SnapshotVerifier {
    /// Takes the next message; returns the previous one, now known not to be the last.
    pub fn push(&mut self, blob: Vec<u8>) -> Option<Vec<u8>> {
        let prev = self.held.replace(blob);
        if let Some(p) = &prev {
            self.db.update(p);
            self.db_bytes += p.len() as u64;
        }
        prev
    }

    /// Bytes known to be database so far.
    pub fn db_bytes(&self) -> u64 {
        self.db_bytes
    }

    /// The stream ended: the held message must be the sha256 of everything before it.
    pub fn finish(mut self) -> Result<Verified, VerifyError> {
        let trailer = self.held.take().ok_or(VerifyError::Empty)?;
        if trailer.len() != 32 {
            return Err(VerifyError::NoTrailingHash(trailer.len()));
        }
        let mut file = self.db.clone();
        let actual: [u8; 32] = self.db.finalize().into();
        if actual[..] != trailer[..] {
            return Err(VerifyError::Mismatch {
                expected: hex::encode(&trailer),
                actual: hex::encode(actual),
                bytes: self.db_bytes,
            });
        }
        file.update(&trailer);
        Ok(Verified { file_bytes: self.db_bytes + 32, file_sha256: file.finalize().into(), trailer })
    }
}

/// zstd plus sha256 of the compressed bytes, emitting output in chunks of about `chunk` bytes.
pub struct Compressor {
    enc: zstd::stream::write::Encoder<'static, Vec<u8>>,
    sha: Sha256,
    bytes: u64,
    chunk: usize,
}

/// What a finished compressor produced.
#[derive(Debug)]
pub struct Compressed {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl Compressor {
    /// `workers`: zstd's own worker threads (0: compress on the calling thread).
    pub fn new(level: i32, chunk: usize, workers: u32) -> std::io::Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(Vec::with_capacity(chunk * 2), level)?;
        if workers > 0 {
            enc.multithread(workers)?;
        }
        Ok(Self { enc, sha: Sha256::new(), bytes: 0, chunk })
    }

    /// Compresses `raw`; returns a chunk of output once enough has accumulated.
    pub fn write(&mut self, raw: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        self.enc.write_all(raw)?;
        if self.enc.get_ref().len() >= self.chunk {
            return Ok(Some(self.take()));
        }
        Ok(None)
    }

    fn take(&mut self) -> Vec<u8> {
        let out = std::mem::replace(self.enc.get_mut(), Vec::with_capacity(self.chunk * 2));
        self.sha.update(&out);
        self.bytes += out.len() as u64;
        out
    }

    /// Ends the zstd frame; returns the last output and the totals.
    pub fn finish(mut self) -> std::io::Result<(Vec<u8>, Compressed)> {
        let last = self.enc.finish()?;
        self.sha.update(&last);
        self.bytes += last.len() as u64;
        let totals = Compressed { bytes: self.bytes, sha256: self.sha.finalize().into() };
        Ok((last, totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(db: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut msgs: Vec<Vec<u8>> = db.chunks(chunk).map(<[u8]>::to_vec).collect();
        msgs.push(Sha256::digest(db).to_vec());
        msgs
    }

    fn run(msgs: Vec<Vec<u8>>) -> (Vec<u8>, Result<Verified, VerifyError>) {
        let mut v = SnapshotVerifier::default();
        let mut out = Vec::new();
        for m in msgs {
            if let Some(p) = v.push(m) {
                out.extend(p);
            }
        }
        (out, v.finish())
    }

    #[test]
    fn trailing_hash_is_found_by_end_of_stream() {
        let db: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (out, ver) = run(stream(&db, 32 * 1024));
        let ver = ver.unwrap();
        assert_eq!(out, db);
        assert_eq!(ver.file_bytes, db.len() as u64 + 32);
        let mut whole = db.clone();
        whole.extend(&ver.trailer);
        assert_eq!(ver.file_sha256[..], Sha256::digest(&whole)[..]);
    }

    #[test]
    fn a_32_byte_data_message_before_the_hash_is_data() {
        // The last data chunk is exactly 32 bytes (as a `remaining_bytes == 0` data message would be).
        let db = vec![9u8; 64];
        let (out, ver) = run(stream(&db, 32));
        assert_eq!(out, db);
        assert!(ver.is_ok());
    }

    #[test]
    fn corrupt_truncated_and_empty_streams_are_refused() {
        let db = vec![1u8; 1000];
        let mut msgs = stream(&db, 100);
        msgs[3][7] ^= 1;
        assert!(matches!(run(msgs).1, Err(VerifyError::Mismatch { .. })));
        let mut msgs = stream(&db, 100);
        msgs.pop(); // no trailer: the last data chunk (100 bytes) is taken for one
        assert!(matches!(run(msgs).1, Err(VerifyError::NoTrailingHash(100))));
        let mut msgs = stream(&db, 100);
        msgs.remove(2); // a lost chunk
        assert!(matches!(run(msgs).1, Err(VerifyError::Mismatch { .. })));
        assert!(matches!(run(vec![]).1, Err(VerifyError::Empty)));
    }

    #[test]
    fn compressor_output_is_one_plain_zstd_stream() {
        let raw: Vec<u8> = (0..2_000_000u32).map(|i| b"kube-apiserver/pods/"[(i % 20) as usize]).collect();
        for workers in [0, 2] {
            let mut c = Compressor::new(3, 64 * 1024, workers).unwrap();
            let mut out = Vec::new();
            for piece in raw.chunks(32 * 1024) {
                if let Some(o) = c.write(piece).unwrap() {
                    out.extend(o);
                }
            }
            let (last, totals) = c.finish().unwrap();
            out.extend(last);
            assert_eq!(totals.bytes, out.len() as u64);
            assert_eq!(totals.sha256[..], Sha256::digest(&out)[..]);
            assert_eq!(zstd::decode_all(&out[..]).unwrap(), raw, "{workers} workers");
        }
    }
}
