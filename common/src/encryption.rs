//! Encryption at rest with age (X25519): agents seal a backup's zstd stream to *recipients* (public keys) and
//! can never open it; *identities* (private keys) live only where the operator puts them — a file kept
//! offline, or the coordinator. The stored object is a plain age file, so `age -d -i key.txt | zstd -d` gives
//! etcd's snapshot back without Ferry.
//!
//! Everything here streams: sealing holds one age chunk (64 KiB) plus the output not yet taken; opening runs
//! age's pull-style reader on a worker thread fed through a small bounded queue.

use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};

use age::secrecy::ExposeSecret;
use age::x25519;

/// An age X25519 recipient (public key), parsed.
pub use age::x25519::Recipient;

/// What every age file starts with; the coordinator checks it on objects it cannot open.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// Recipients one backup may be sealed to: a few for rotation and a key kept in a safe; every one adds a
/// header stanza and an X25519 operation per backup.
pub const MAX_RECIPIENTS: usize = 16;
/// Pieces of ciphertext queued for the opening thread (each up to a data frame, 1 MiB): bounds memory.
const OPEN_QUEUE: usize = 4;
/// An identity file larger than this is not an identity file (age itself stops at 16 MiB).
const MAX_IDENTITY_FILE: u64 = 64 * 1024;

/// An encryption setting, identity file or encrypted object is not usable; the message says why.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("{0:?} is not an age X25519 recipient (age1…, as `ferryctl encryption keygen` or `age-keygen -y KEYFILE` prints)")]
    BadRecipient(String),
    #[error("an age identity (a secret key, AGE-SECRET-KEY-1…) was given where a recipient belongs; give its recipient instead (`age-keygen -y KEYFILE` prints it) and keep the identity off Ferry's resources")]
    IdentityAsRecipient,
    #[error("recipient {0} is listed twice")]
    DuplicateRecipient(String),
    #[error("{0} recipients given; at most {MAX_RECIPIENTS}")]
    TooManyRecipients(usize),
    #[error("read identity file {path}: {error}")]
    ReadIdentity { path: PathBuf, error: io::Error },
    #[error("identity file {path} is readable by group or others (mode {mode:03o}); run `chmod 600 {path}`: it opens every backup encrypted to it")]
    IdentityPermissions { path: PathBuf, mode: u32 },
    #[error("identity file {path}: line {line} is not an age X25519 identity (AGE-SECRET-KEY-1…); write it with `ferryctl encryption keygen` or `age-keygen`")]
    BadIdentity { path: PathBuf, line: usize },
    #[error("identity file {0} holds no identity")]
    NoIdentity(PathBuf),
    #[error("the backup is encrypted: pass --identity FILE with the identity of one of its recipients: {}", .0.join(", "))]
    IdentityNeeded(Vec<String>),
    #[error("wrong identity: it opens {}, but the backup is encrypted to {}; use the identity of one of those", .have.join(", "), .needs.join(", "))]
    WrongIdentity { have: Vec<String>, needs: Vec<String> },
    #[error("the object is not an age file ({0}); it was not stored by an encrypting Ferry or is damaged")]
    NotAge(String),
    #[error("the encrypted backup does not decrypt ({0}): the object is damaged or was tampered with")]
    Tampered(String),
    #[error("age: {0}")]
    Seal(String),
    /// The writer the plaintext goes to failed (for a restore: zstd or a file).
    #[error("{0}")]
    Output(io::Error),
}

/// The longest age header Ferry reads: [`MAX_RECIPIENTS`] X25519 stanzas take under 2 KiB.
pub const MAX_AGE_HEADER: usize = 8 * 1024;
/// age's payload: a 16-byte nonce, then chunks of 64 KiB of plaintext, each with a 16-byte tag.
const AGE_NONCE: u64 = 16;

/// What an age file's header says, read without a key: how long it is and how many X25519 stanzas it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgeHeader {
    /// Bytes up to and including the MAC line's newline.
    pub len: usize,
    pub x25519_stanzas: usize,
}

impl AgeHeader {
    /// Parses the header at the start of `head` (at least the whole header, at most [`MAX_AGE_HEADER`] are
    /// looked at): the version line, stanzas (`-> TYPE ARGS…` then base64 body lines, the last shorter than 64
    /// columns), the MAC line. Anything else is refused by name. An X25519 stanza has one 43-column argument
    /// and a 43-column body: age names no recipient in it, so the count is what a header tells of them. age's
    /// grease stanzas are passed over.
    pub fn parse(head: &[u8]) -> Result<Self, EncryptionError> {
        let bad = |why: &str| Err(EncryptionError::NotAge(format!("its header is malformed: {why}")));
        let head = &head[..head.len().min(MAX_AGE_HEADER)];
        let Some(rest) = head.strip_prefix(AGE_MAGIC) else {
            return bad("it does not start with age's version line");
        };
        let mut pos = AGE_MAGIC.len();
        let mut lines = rest.split_inclusive(|b| *b == b'\n');
        let mut x25519_stanzas = 0;
        let b64 = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
        loop {
            let Some(line) = lines.next() else { return bad("it ends before its MAC line") };
            pos += line.len();
            let Some(line) = line.strip_suffix(b"\n") else { return bad("it ends before its MAC line") };
            let Ok(line) = std::str::from_utf8(line) else { return bad("a header line is not text") };
            if let Some(mac) = line.strip_prefix("--- ") {
                if mac.len() != 43 || !b64(mac) {
                    return bad("its MAC is not 32 bytes of base64");
                }
                return Ok(Self { len: pos, x25519_stanzas });
            }
            let Some(stanza) = line.strip_prefix("-> ") else { return bad("a line is neither a stanza nor the MAC") };
            let args: Vec<&str> = stanza.split(' ').collect();
            // age adds random "grease" stanzas (types ending in -grease) that every reader ignores and that no
            // identity unwraps: allowed, not counted. Any other type would be a recipient Ferry never seals to.
            let grease = args[0].ends_with("-grease");
            if !grease && args[0] != "X25519" {
                return bad(&format!("a {:?} stanza (Ferry seals to X25519 recipients only)", args[0]));
            }
            if args.iter().any(|a| a.is_empty() || !a.bytes().all(|b| b.is_ascii_graphic())) {
                return bad("a stanza argument is empty or not printable");
            }
            if !grease && (args.len() != 2 || args[1].len() != 43 || !b64(args[1])) {
                return bad("an X25519 stanza's share is not 32 bytes of base64");
            }
            // The body: full 64-column lines, then one shorter (for X25519, one line of 43).
            let mut body = 0;
            loop {
                let Some(b) = lines.next() else { return bad("it ends inside a stanza") };
                pos += b.len();
                let Some(b) = b.strip_suffix(b"\n") else { return bad("it ends inside a stanza") };
                let Ok(b) = std::str::from_utf8(b) else { return bad("a stanza body is not text") };
                if b.len() > 64 || !b64(b) {
                    return bad("a stanza body line is not base64 of at most 64 columns");
                }
                body += b.len();
                if b.len() < 64 {
                    break;
                }
            }
            if grease {
                continue;
            }
            if body != 43 {
                return bad("an X25519 stanza's body is not a 32-byte wrapped key");
            }
            x25519_stanzas += 1;
        }
    }

    /// The size of an age file with this header sealing `plain` bytes.
    pub fn sealed_size(&self, plain: u64) -> u64 {
        let chunks = plain.div_ceil(AGE_CHUNK as u64).max(1);
        // `plain` may be an agent's word: saturated, an absurd size matches no object instead of wrapping.
        (self.len as u64 + AGE_NONCE).saturating_add(plain).saturating_add(chunks.saturating_mul(AGE_TAG as u64))
    }
}

/// Checks a list of recipients as a resource gives it: each an X25519 recipient, none twice, not too many.
pub fn parse_recipients(list: &[String]) -> Result<Vec<x25519::Recipient>, EncryptionError> {
    if list.len() > MAX_RECIPIENTS {
        return Err(EncryptionError::TooManyRecipients(list.len()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        if list[..i].contains(r) {
            return Err(EncryptionError::DuplicateRecipient(r.clone()));
        }
        if r.trim().to_ascii_uppercase().starts_with("AGE-SECRET-KEY") {
            // Never echoed: it is a secret.
            return Err(EncryptionError::IdentityAsRecipient);
        }
        out.push(x25519::Recipient::from_str(r.trim()).map_err(|_| EncryptionError::BadRecipient(r.clone()))?);
    }
    Ok(out)
}

/// A new identity, as `age-keygen` writes it, and its recipient.
pub struct NewIdentity {
    /// The identity file's text: comments with the creation time and public key, then the secret key.
    pub file_text: String,
    pub recipient: String,
}

impl std::fmt::Debug for NewIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewIdentity").field("recipient", &self.recipient).finish_non_exhaustive()
    }
}

/// Generates an X25519 identity.
pub fn keygen() -> NewIdentity {
    let id = x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let file_text = format!("# created: {created}\n# public key: {recipient}\n{}\n", id.to_string().expose_secret());
    NewIdentity { file_text, recipient }
}

/// Identities read from an identity file. `Debug` shows only their recipients.
#[derive(Clone)]
pub struct Identities {
    keys: Vec<x25519::Identity>,
    path: PathBuf,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").field("path", &self.path).field("recipients", &self.recipients()).finish()
    }
}

impl Identities {
    /// Reads an identity file (the format of `age-keygen`: `#` comments, one `AGE-SECRET-KEY-1…` a line),
    /// refusing one that group or others can read. Errors name a line, never its text.
    pub fn load(path: &Path) -> Result<Self, EncryptionError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |error| EncryptionError::ReadIdentity { path: path.into(), error };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(EncryptionError::IdentityPermissions { path: path.into(), mode });
        }
        let file = std::fs::File::open(path).map_err(read)?;
        let mut keys = Vec::new();
        for (i, line) in io::BufReader::new(file.take(MAX_IDENTITY_FILE)).lines().enumerate() {
            let line = line.map_err(read)?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = x25519::Identity::from_str(line)
                .map_err(|_| EncryptionError::BadIdentity { path: path.into(), line: i + 1 })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(EncryptionError::NoIdentity(path.into()));
        }
        Ok(Self { keys, path: path.into() })
    }

    /// The recipients these identities open (their public keys).
    pub fn recipients(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.to_public().to_string()).collect()
    }

    /// Whether one of these identities opens a backup encrypted to `needs`; fails naming both sides if not.
    pub fn check_opens(&self, needs: &[String]) -> Result<(), EncryptionError> {
        let have = self.recipients();
        if needs.iter().any(|n| have.contains(n)) {
            Ok(())
        } else {
            Err(EncryptionError::WrongIdentity { have, needs: needs.to_vec() })
        }
    }

    /// Decrypts the age file read from `input` into `output`; returns the plaintext bytes written.
    pub fn open<R: Read, W: Write>(&self, input: R, output: &mut W) -> Result<u64, EncryptionError> {
        let decryptor = age::Decryptor::new_buffered(io::BufReader::new(input)).map_err(|e| match e {
            age::DecryptError::Io(e) => EncryptionError::NotAge(e.to_string()),
            age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat => {
                EncryptionError::NotAge("no valid age header".into())
            }
            other => EncryptionError::Tampered(other.to_string()),
        })?;
        let mut reader = decryptor.decrypt(self.keys.iter().map(|k| k as &dyn age::Identity)).map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                EncryptionError::WrongIdentity { have: self.recipients(), needs: vec!["other recipients".into()] }
            }
            age::DecryptError::InvalidMac => {
                EncryptionError::Tampered("the header's authentication tag does not match".into())
            }
            other => EncryptionError::Tampered(other.to_string()),
        })?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EncryptionError::Tampered(e.to_string())),
            };
            output.write_all(&buf[..n]).map_err(EncryptionError::Output)?;
            total += n as u64;
        }
    }
}

/// A buffer the age writer fills and the sealer empties.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// The ciphertext so far; the buffer starts again with room for `next` bytes, so age's chunks are
    /// appended without the buffer growing (and copying itself) chunk by chunk.
    fn take(&self, next: usize) -> Vec<u8> {
        std::mem::replace(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner), Vec::with_capacity(next))
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// age's plaintext chunk and what each adds when sealed (its Poly1305 tag).
const AGE_CHUNK: usize = 64 * 1024;
const AGE_TAG: usize = 16;

/// Seals a stream to recipients, counting what it emits (the object as stored). It does not hash the
/// ciphertext: the coordinator hashes the stored object itself when it checks it before committing.
pub struct Sealer {
    writer: age::stream::StreamWriter<SharedBuf>,
    out: SharedBuf,
    bytes: u64,
}

/// What a finished sealer emitted.
#[derive(Debug, Clone, Copy)]
pub struct Sealed {
    pub bytes: u64,
}

impl Sealer {
    pub fn new(recipients: &[x25519::Recipient]) -> Result<Self, EncryptionError> {
        let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| EncryptionError::Seal(e.to_string()))?;
        let out = SharedBuf::default();
        let writer = encryptor.wrap_output(out.clone()).map_err(|e| EncryptionError::Seal(e.to_string()))?;
        Ok(Self { writer, out, bytes: 0 })
    }

    /// Seals `plain`; returns the ciphertext ready so far (empty until a 64 KiB age chunk is full).
    pub fn seal(&mut self, plain: &[u8]) -> io::Result<Vec<u8>> {
        self.writer.write_all(plain)?;
        // The next call is likely the same size as this one: room for it, chunk tags included.
        let next = plain.len() + (plain.len() / AGE_CHUNK + 1) * AGE_TAG;
        let out = self.out.take(next);
        self.bytes += out.len() as u64;
        Ok(out)
    }

    /// Writes the last (authenticated as last) chunk; returns it and the totals.
    pub fn finish(self) -> io::Result<(Vec<u8>, Sealed)> {
        let Self { writer, out, bytes } = self;
        writer.finish()?;
        let last = out.take(0);
        let bytes = bytes + last.len() as u64;
        Ok((last, Sealed { bytes }))
    }
}

/// Ciphertext pieces from the queue as one `Read`.
struct QueueReader {
    rx: Receiver<Vec<u8>>,
    piece: Vec<u8>,
    pos: usize,
}

impl Read for QueueReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.piece.len() {
            match self.rx.recv() {
                Ok(p) => {
                    self.piece = p;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // the writer finished (or gave up): end of input
            }
        }
        let n = buf.len().min(self.piece.len() - self.pos);
        buf[..n].copy_from_slice(&self.piece[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Decrypts a stream pushed in pieces (as it arrives from the network) into `W`: age reads, so its reader
/// runs on a worker thread fed through a bounded queue.
pub struct OpeningWriter<W: Write + Send + 'static> {
    tx: Option<SyncSender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<Result<W, EncryptionError>>>,
}

impl<W: Write + Send + 'static> OpeningWriter<W> {
    pub fn new(identities: Identities, mut inner: W) -> Result<Self, EncryptionError> {
        let (tx, rx) = sync_channel::<Vec<u8>>(OPEN_QUEUE);
        let worker = std::thread::Builder::new()
            .name("ferry-age-open".into())
            .spawn(move || {
                let input = QueueReader { rx, piece: Vec::new(), pos: 0 };
                identities.open(input, &mut inner)?;
                Ok(inner)
            })
            .map_err(EncryptionError::Output)?;
        Ok(Self { tx: Some(tx), worker: Some(worker) })
    }

    /// Queues ciphertext; fails with the worker's error once it stopped.
    pub fn write(&mut self, data: &[u8]) -> Result<(), EncryptionError> {
        if let Some(tx) = &self.tx {
            if tx.send(data.to_vec()).is_ok() {
                return Ok(());
            }
        }
        self.tx = None;
        Err(self.join().err().unwrap_or_else(|| EncryptionError::Tampered("data after the end of the age file".into())))
    }

    /// Ends the input; returns the inner writer once every byte decrypted and authenticated.
    pub fn finish(mut self) -> Result<W, EncryptionError> {
        self.tx = None;
        self.join()
    }

    fn join(&mut self) -> Result<W, EncryptionError> {
        match self.worker.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(EncryptionError::Output(io::Error::other("the decrypting thread panicked"))),
            None => Err(EncryptionError::Output(io::Error::other("the decrypting thread already ended"))),
        }
    }
}

impl<W: Write + Send + 'static> Drop for OpeningWriter<W> {
    fn drop(&mut self) {
        // The queue closes, the worker sees the end of its input and stops.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity_file(dir: &Path, name: &str) -> (PathBuf, String) {
        let new = keygen();
        let path = dir.join(name);
        let mut f = crate::config::create_private(&path).unwrap();
        f.write_all(new.file_text.as_bytes()).unwrap();
        (path, new.recipient)
    }

    fn seal_all(recipients: &[String], plain: &[u8]) -> Vec<u8> {
        let mut s = Sealer::new(&parse_recipients(recipients).unwrap()).unwrap();
        let mut out = Vec::new();
        for piece in plain.chunks(100_000) {
            out.extend(s.seal(piece).unwrap());
        }
        let (last, totals) = s.finish().unwrap();
        out.extend(last);
        assert_eq!(totals.bytes, out.len() as u64);
        out
    }

    fn open_pushed(ids: &Identities, sealed: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        let mut w = OpeningWriter::new(ids.clone(), Vec::new())?;
        for piece in sealed.chunks(7_000) {
            w.write(piece)?;
        }
        w.finish()
    }

    #[test]
    fn sealed_streams_open_with_either_identity_and_not_with_another() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ra) = identity_file(dir.path(), "a.txt");
        let (b, rb) = identity_file(dir.path(), "b.txt");
        let (c, _) = identity_file(dir.path(), "c.txt");
        let plain: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
        let sealed = seal_all(&[ra.clone(), rb.clone()], &plain);
        assert!(sealed.starts_with(AGE_MAGIC));
        for path in [&a, &b] {
            let ids = Identities::load(path).unwrap();
            assert_eq!(open_pushed(&ids, &sealed).unwrap(), plain);
        }
        let other = Identities::load(&c).unwrap();
        assert!(matches!(other.check_opens(&[ra, rb]), Err(EncryptionError::WrongIdentity { .. })));
        assert!(matches!(open_pushed(&other, &sealed), Err(EncryptionError::WrongIdentity { .. })));
        assert!(!format!("{other:?}").contains("AGE-SECRET-KEY"), "Debug shows no secret");
    }

    #[test]
    fn tampered_truncated_and_foreign_objects_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ra) = identity_file(dir.path(), "a.txt");
        let ids = Identities::load(&a).unwrap();
        let plain = vec![5u8; 300_000];
        let sealed = seal_all(&[ra], &plain);
        let mut flipped = sealed.clone();
        let n = flipped.len();
        flipped[n / 2] ^= 1;
        assert!(matches!(open_pushed(&ids, &flipped), Err(EncryptionError::Tampered(_))));
        assert!(matches!(open_pushed(&ids, &sealed[..n - 100]), Err(EncryptionError::Tampered(_))));
        assert!(matches!(open_pushed(&ids, &plain), Err(EncryptionError::NotAge(_))));
    }

    #[test]
    fn age_headers_are_read_without_a_key() {
        let recipients: Vec<String> = (0..3).map(|_| keygen().recipient).collect();
        for n in 1..=3 {
            for plain in [0usize, 1, 65_536, 65_537, 300_000] {
                let data = vec![7u8; plain];
                let sealed = seal_all(&recipients[..n], &data);
                let h = AgeHeader::parse(&sealed).unwrap();
                assert_eq!(h.x25519_stanzas, n);
                assert_eq!(h.sealed_size(plain as u64), sealed.len() as u64, "{n} recipients, {plain} bytes");
            }
        }
        let sealed = seal_all(&recipients[..1], b"x");
        let h = AgeHeader::parse(&sealed).unwrap();
        // A header followed by anything else parses (only its size gives that away), a broken one does not.
        let mut plain_after = sealed[..h.len].to_vec();
        plain_after.extend_from_slice(b"plain zstd here");
        assert_eq!(AgeHeader::parse(&plain_after).unwrap(), h);
        for broken in [
            &sealed[..h.len - 1],
            &sealed[..AGE_MAGIC.len() + 3],
            b"age-encryption.org/v1\n-> scrypt abc 18\nxxxx\n--- aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
            b"age-encryption.org/v2\n",
        ] {
            assert!(matches!(AgeHeader::parse(broken), Err(EncryptionError::NotAge(_))), "{broken:?}");
        }
    }

    #[test]
    fn identity_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = identity_file(dir.path(), "a.txt");
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identities::load(&a).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "# comment\nAGE-SECRET-KEY-1NOTAKEY\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Identities::load(&bad).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("NOTAKEY"), "{e}");
        assert!(matches!(parse_recipients(&["age1nope".into()]), Err(EncryptionError::BadRecipient(_))));
        let pasted = keygen().file_text.lines().last().unwrap().to_owned();
        let e = parse_recipients(std::slice::from_ref(&pasted)).unwrap_err().to_string();
        assert!(e.contains("identity") && !e.contains(&pasted), "{e}");
        let r = keygen().recipient;
        assert!(matches!(parse_recipients(&[r.clone(), r]), Err(EncryptionError::DuplicateRecipient(_))));
    }
}
