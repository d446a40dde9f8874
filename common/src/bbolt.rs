//! The etcd member ids an etcd snapshot holds (its bbolt `members` bucket), read while the snapshot streams
//! past, without a temp file: what binds a backup to the cluster it came from.
//!
//! A snapshot is bbolt's file as `Tx.WriteTo` writes it: page 0 is the current meta page, whose root bucket
//! page names the top-level buckets. etcd's `members` bucket is small and usually *inline* in that root page
//! (a bucket under a quarter page is stored inside its parent), so catching one page is enough; a larger one
//! has pages of its own, caught too when they come after the root page. Pages that went by before they were
//! known to matter are not read back: then the members are unknown ([`Members::Unread`]), never guessed.
//!
//! Layout used (bbolt's `page.go`, `node.go`): a page header is id u64, flags u16, count u16, overflow u32; a
//! meta page's root bucket page id sits 32 bytes in; leaf elements are flags u32, pos u32, ksize u32,
//! vsize u32 (pos relative to the element), branch elements pos u32, ksize u32, pgid u64; a bucket value is
//! its root page id u64 and sequence u64, followed by the inline page when the root is 0.

use std::collections::BTreeSet;

const PAGE_HEADER: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const BUCKET_LEAF: u32 = 0x01;
const ELEMENT: usize = 16;
const BUCKET_HEADER: usize = 16;
/// Pages kept at once while looking: the root page and the member bucket's pages are a few KiB.
const MAX_CAPTURE: usize = 4 << 20;
/// etcd's bucket of cluster members: member id (hex) → its JSON.
const MEMBERS_BUCKET: &[u8] = b"members";

/// What the snapshot says of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// The member ids in its `members` bucket.
    Read(Vec<u64>),
    /// Not read, and why (pages out of streaming order, an unusual layout): nothing can be said.
    Unread(String),
}

/// What a page is wanted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Want {
    /// The root bucket's page (or a branch under it): find `members`.
    Root,
    /// A page of the `members` bucket: collect its keys.
    Members,
}

/// Feed it the raw snapshot in order ([`Self::write`]); [`Self::finish`] says what it found.
#[derive(Debug, Default)]
pub struct MembersReader {
    /// Bytes seen so far.
    offset: u64,
    page_size: u64,
    /// The first page, until it is whole.
    head: Vec<u8>,
    /// Pages still to catch, by page id.
    want: BTreeSet<(u64, Want)>,
    /// The page being caught: its id, what for, and its bytes so far.
    catching: Option<(u64, Want, Vec<u8>)>,
    found: Vec<u64>,
    /// Whether the `members` bucket was located.
    located: bool,
    unread: Option<String>,
}

impl MembersReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.unread.is_none() {
            if self.page_size == 0 {
                let n = (4096 - self.head.len()).min(data.len());
                self.head.extend_from_slice(&data[..n]);
                self.offset += n as u64;
                data = &data[n..];
                if self.head.len() == 4096 {
                    self.start();
                }
                continue;
            }
            if let Some((pgid, want, mut page)) = self.catching.take() {
                let need = self.page_len(&page);
                let n = (need - page.len()).min(data.len());
                page.extend_from_slice(&data[..n]);
                self.offset += n as u64;
                data = &data[n..];
                if page.len() < self.page_len(&page) {
                    self.catching = Some((pgid, want, page));
                } else {
                    self.read_page(pgid, want, &page);
                }
                continue;
            }
            let Some(&(pgid, want)) = self.want.iter().next() else {
                // Nothing more to catch: the rest only counts.
                self.offset += data.len() as u64;
                return;
            };
            let at = pgid.saturating_mul(self.page_size);
            if at < self.offset {
                self.want.remove(&(pgid, want));
                self.unread = Some(format!("bucket page {pgid} comes before the page that names it"));
                return;
            }
            let skip = (at - self.offset).min(data.len() as u64) as usize;
            self.offset += skip as u64;
            data = &data[skip..];
            if self.offset == at {
                self.want.remove(&(pgid, want));
                self.catching = Some((pgid, want, Vec::with_capacity(self.page_size as usize)));
            }
        }
    }

    pub fn finish(mut self) -> Members {
        if let Some(why) = self.unread.take() {
            return Members::Unread(why);
        }
        if self.page_size == 0 {
            return Members::Unread("shorter than one page".into());
        }
        if !self.located {
            return Members::Unread("no members bucket".into());
        }
        if self.catching.is_some() || !self.want.is_empty() {
            return Members::Unread("it ends before the members bucket's pages".into());
        }
        self.found.sort_unstable();
        self.found.dedup();
        Members::Read(self.found)
    }

    /// The meta page is whole: the page size and the root bucket's page.
    fn start(&mut self) {
        let page_size = match page_size_of(&self.head) {
            Ok(p) => p,
            Err(why) => {
                self.unread = Some(why);
                return;
            }
        };
        self.page_size = page_size;
        let root = u64_at(&self.head, PAGE_HEADER + 16);
        self.head = Vec::new();
        self.want.insert((root, Want::Root));
        // The head already went by; whatever follows is streamed from here.
        if root.saturating_mul(page_size) < self.offset {
            self.unread = Some(format!("root bucket page {root} lies in the first page"));
        }
    }

    /// A caught page's length so far needed: its header, then its overflow pages.
    fn page_len(&self, page: &[u8]) -> usize {
        if page.len() < PAGE_HEADER {
            return PAGE_HEADER;
        }
        let overflow = u64::from(u32_at(page, 12));
        let len = (overflow + 1).saturating_mul(self.page_size);
        usize::try_from(len).unwrap_or(usize::MAX).min(MAX_CAPTURE)
    }

    fn read_page(&mut self, pgid: u64, want: Want, page: &[u8]) {
        if let Err(why) = self.parse(pgid, want, page) {
            self.unread = Some(why);
        }
    }

    fn parse(&mut self, pgid: u64, want: Want, page: &[u8]) -> Result<(), String> {
        let flags = u16_at(page, 8);
        let count = usize::from(u16_at(page, 10));
        for i in 0..count {
            let e = PAGE_HEADER + i * ELEMENT;
            if e + ELEMENT > page.len() {
                return Err(format!("page {pgid} holds fewer elements than it says"));
            }
            if flags & BRANCH != 0 {
                // A branch: every child may hold what is wanted; only those still to come can be caught.
                let child = u64_at(page, e + 8);
                if child.saturating_mul(self.page_size) < self.offset {
                    return Err(format!("page {child} comes before the branch page {pgid} that names it"));
                }
                self.want.insert((child, want));
                continue;
            }
            if flags & LEAF == 0 {
                return Err(format!("page {pgid} is neither a branch nor a leaf page"));
            }
            let Some((eflags, key, value)) = leaf_element(page, e) else {
                return Err(format!("an element of page {pgid} runs past the page"));
            };
            match want {
                Want::Root if key == MEMBERS_BUCKET && eflags & BUCKET_LEAF != 0 => {
                    self.located = true;
                    self.members_bucket(value)?;
                }
                Want::Root => {}
                Want::Members => self.member(key)?,
            }
        }
        Ok(())
    }

    /// The `members` bucket's value: its pages still to come, or the inline page inside it.
    fn members_bucket(&mut self, value: &[u8]) -> Result<(), String> {
        if value.len() < BUCKET_HEADER {
            return Err("the members bucket's header is cut short".into());
        }
        match u64_at(value, 0) {
            0 => {
                let inline = &value[BUCKET_HEADER..];
                if inline.len() < PAGE_HEADER {
                    return Err("the inline members bucket is cut short".into());
                }
                self.parse(0, Want::Members, inline)
            }
            root if root.saturating_mul(self.page_size) < self.offset => {
                Err(format!("the members bucket's page {root} comes before the root page"))
            }
            root => {
                self.want.insert((root, Want::Members));
                Ok(())
            }
        }
    }

    /// One key of the `members` bucket: a member id in hex.
    fn member(&mut self, key: &[u8]) -> Result<(), String> {
        let id = std::str::from_utf8(key).ok().and_then(|k| u64::from_str_radix(k, 16).ok());
        match id {
            Some(id) => {
                self.found.push(id);
                Ok(())
            }
            None => Err(format!("a members bucket key is not a member id: {:?}", String::from_utf8_lossy(key))),
        }
    }
}

/// etcd's `meta` bucket key holding the revision of its last finished compaction.
const FINISHED_COMPACT: &[u8] = b"finishedCompactRev";
/// Leaf pages (with their overflow) longer than this are passed over: etcd's values are at most its request
/// limit (1.5 MiB by default, a few MiB where raised).
const MAX_LEAF: usize = 64 << 20;

/// The revision an etcd snapshot is at, read while it streams past, in one pass whatever the page order: the
/// highest revision among the `key` bucket's entries on every leaf page (an entry's key is its revision, 8
/// bytes main, `_`, 8 bytes sub, `t` for a deletion; a put's value must carry that main revision as its
/// `mod_revision`), and the `meta` bucket's finished compaction. A freed page holds older entries only, so the
/// highest is the snapshot's: what etcd itself starts at (`mvcc.store.restore`). Every page is looked at
/// (a freed run's later pages may be live pages again); a page whose header does not name its own id is not
/// the start of a page.
#[derive(Debug, Default)]
pub struct RevisionReader {
    page_size: u64,
    /// Bytes from page `pos` on that could not be looked at yet: a part page, or a leaf run not yet whole.
    window: Vec<u8>,
    pos: u64,
    highest: i64,
    compacted: i64,
    failed: Option<String>,
}

impl RevisionReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.page_size == 0 {
            self.window.extend_from_slice(data);
            if self.window.len() < 4096 {
                return;
            }
            match page_size_of(&self.window) {
                Ok(p) => self.page_size = p,
                Err(why) => {
                    self.failed = Some(why);
                    self.window = Vec::new();
                    return;
                }
            }
            self.rescan(false);
        } else if self.window.is_empty() {
            // Straight from the caller's buffer: only what is left over is copied.
            let used = self.scan(data, false);
            self.window.extend_from_slice(&data[used..]);
        } else {
            self.window.extend_from_slice(data);
            self.rescan(false);
        }
    }

    fn rescan(&mut self, last: bool) {
        let window = std::mem::take(&mut self.window);
        let used = self.scan(&window, last);
        self.window = window;
        self.window.drain(..used);
    }

    /// Looks at every whole page of `buf` (page `pos` first); a leaf run is read once it is whole (or at the
    /// end, `last`). Returns the bytes done with.
    fn scan(&mut self, buf: &[u8], last: bool) -> usize {
        let ps = self.page_size as usize;
        let mut at = 0;
        while buf.len() - at >= ps {
            let page = &buf[at..];
            let (id, flags, overflow) = (u64_at(page, 0), u16_at(page, 8), u64::from(u32_at(page, 12)));
            if id == self.pos && flags & LEAF != 0 {
                let need = (overflow + 1).saturating_mul(self.page_size);
                let need = usize::try_from(need).unwrap_or(usize::MAX);
                if need <= MAX_LEAF {
                    if page.len() < need && !last {
                        break;
                    }
                    scan_leaf(&page[..need.min(page.len())], 0, &mut self.highest, &mut self.compacted);
                }
            }
            at += ps;
            self.pos += 1;
        }
        at
    }

    /// The snapshot's revision (0: none found), or why it could not be read.
    pub fn finish(mut self) -> Result<i64, String> {
        if self.page_size > 0 && self.failed.is_none() {
            self.rescan(true);
        }
        if let Some(why) = self.failed {
            return Err(why);
        }
        if self.page_size == 0 {
            return Err("shorter than one page".into());
        }
        Ok(self.highest.max(self.compacted))
    }
}

/// Every entry of a leaf page, raising `highest` (revision keys) and `compacted` (the finished compaction);
/// inline buckets (small buckets live inside their parent's page) too.
fn scan_leaf(page: &[u8], depth: usize, highest: &mut i64, compacted: &mut i64) {
    let count = usize::from(u16_at(page, 10));
    for i in 0..count {
        let e = PAGE_HEADER + i * ELEMENT;
        if e + ELEMENT > page.len() {
            return;
        }
        let Some((eflags, key, value)) = leaf_element(page, e) else { return };
        if eflags & BUCKET_LEAF != 0 {
            if depth < 4 && value.len() >= BUCKET_HEADER + PAGE_HEADER && u64_at(value, 0) == 0 {
                scan_leaf(&value[BUCKET_HEADER..], depth + 1, highest, compacted);
            }
            continue;
        }
        if key == FINISHED_COMPACT && value.len() >= 8 {
            *compacted = (*compacted).max(main_revision(value));
            continue;
        }
        let main = match key.len() {
            17 if key[8] == b'_' => main_revision(key),
            18 if key[8] == b'_' && key[17] == b't' => main_revision(key),
            _ => continue,
        };
        if main <= *highest {
            continue;
        }
        let believed = if key.len() == 17 { mod_revision(value) == Some(main) } else { only_a_key(value) };
        if believed {
            *highest = main;
        }
    }
}

/// The main revision of an etcd revision key (big-endian, first 8 bytes).
fn main_revision(b: &[u8]) -> i64 {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    i64::from_be_bytes(m)
}

/// A protobuf varint at `b[*at..]`, moving `at` past it.
fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of an encoded `mvccpb.KeyValue`, as (field, varint value or 0); `None` when it is not one.
fn kv_fields(b: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let tag = varint(b, &mut at)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => out.push((field, varint(b, &mut at)?)),
            2 => {
                let len = usize::try_from(varint(b, &mut at)?).ok()?;
                at = at.checked_add(len).filter(|end| *end <= b.len())?;
                out.push((field, 0));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A put's `mod_revision` (field 3).
fn mod_revision(value: &[u8]) -> Option<i64> {
    let fields = kv_fields(value)?;
    fields.iter().find(|(f, _)| *f == 3).and_then(|(_, v)| i64::try_from(*v).ok())
}

/// A deletion's value: a `KeyValue` holding only its key.
fn only_a_key(value: &[u8]) -> bool {
    kv_fields(value).is_some_and(|f| f.len() == 1 && f[0].0 == 1)
}

/// The page size a bbolt file's first (meta) page names, when it is one bbolt could have written.
fn page_size_of(head: &[u8]) -> Result<u64, String> {
    let page_size = u64::from(u32_at(head, PAGE_HEADER + 8));
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(format!("page size {page_size}"));
    }
    Ok(page_size)
}

/// The leaf element whose header is at `e` (its flags, key and value), or `None` when it runs past the page.
fn leaf_element(page: &[u8], e: usize) -> Option<(u32, &[u8], &[u8])> {
    let (eflags, pos, ksize, vsize) =
        (u32_at(page, e), u32_at(page, e + 4) as usize, u32_at(page, e + 8) as usize, u32_at(page, e + 12) as usize);
    let k = e.saturating_add(pos);
    let v = k.saturating_add(ksize);
    let end = v.saturating_add(vsize);
    (end <= page.len()).then(|| (eflags, &page[k..v], &page[v..end]))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    /// A leaf page (id `pgid`) of `(flags, key, value)` elements.
    fn leaf(pgid: u64, elements: &[(u32, &[u8], Vec<u8>)]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_HEADER + elements.len() * ELEMENT];
        p[..8].copy_from_slice(&pgid.to_le_bytes());
        p[8..10].copy_from_slice(&LEAF.to_le_bytes());
        p[10..12].copy_from_slice(&(elements.len() as u16).to_le_bytes());
        for (i, (flags, k, v)) in elements.iter().enumerate() {
            let e = PAGE_HEADER + i * ELEMENT;
            let pos = p.len() - e;
            p[e..e + 4].copy_from_slice(&flags.to_le_bytes());
            p[e + 4..e + 8].copy_from_slice(&(pos as u32).to_le_bytes());
            p[e + 8..e + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            p[e + 12..e + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
            p.extend_from_slice(k);
            p.extend_from_slice(v);
        }
        p
    }

    fn bucket(root: u64, inline: Option<Vec<u8>>) -> Vec<u8> {
        let mut v = root.to_le_bytes().to_vec();
        v.extend_from_slice(&0u64.to_le_bytes());
        v.extend(inline.unwrap_or_default());
        v
    }

    /// A file of `pages` pages: a meta page naming `root`, and `put` pages at their ids.
    fn file(pages: usize, root: u64, put: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut f = vec![0u8; pages * PS];
        f[PAGE_HEADER + 8..PAGE_HEADER + 12].copy_from_slice(&(PS as u32).to_le_bytes());
        f[PAGE_HEADER + 16..PAGE_HEADER + 24].copy_from_slice(&root.to_le_bytes());
        for (pgid, p) in put {
            let at = *pgid as usize * PS;
            f[at..at + p.len()].copy_from_slice(p);
        }
        f
    }

    fn read(f: &[u8], piece: usize) -> Members {
        let mut r = MembersReader::new();
        for c in f.chunks(piece) {
            r.write(c);
        }
        r.finish()
    }

    fn members_page(pgid: u64, ids: &[u64]) -> Vec<u8> {
        let keys: Vec<String> = ids.iter().map(|id| format!("{id:x}")).collect();
        leaf(pgid, &keys.iter().map(|k| (0, k.as_bytes(), b"{}".to_vec())).collect::<Vec<_>>())
    }

    #[test]
    fn inline_and_separate_members_buckets_are_read_in_any_piece_size() {
        let inline = members_page(0, &[0x8e9e05c52164694d, 0x91bc3c398fb3c146]);
        let root = leaf(
            3,
            &[
                (BUCKET_LEAF, b"key", bucket(7, None)),
                (BUCKET_LEAF, b"members", bucket(0, Some(inline))),
                (BUCKET_LEAF, b"meta", bucket(0, Some(leaf(0, &[])))),
            ],
        );
        let f = file(9, 3, &[(3, root)]);
        for piece in [1, 7, 4096, 100_000] {
            assert_eq!(read(&f, piece), Members::Read(vec![0x8e9e05c52164694d, 0x91bc3c398fb3c146]), "{piece}");
        }
        // A members bucket with a page of its own, after the root page.
        let root = leaf(2, &[(BUCKET_LEAF, b"members", bucket(5, None))]);
        let f = file(8, 2, &[(2, root.clone()), (5, members_page(5, &[1, 2, 3]))]);
        assert_eq!(read(&f, 1000), Members::Read(vec![1, 2, 3]));
        // ... before it: not readable in one pass, said so rather than guessed.
        let root = leaf(6, &[(BUCKET_LEAF, b"members", bucket(4, None))]);
        let f = file(8, 6, &[(6, root), (4, members_page(4, &[1]))]);
        assert!(matches!(read(&f, 1000), Members::Unread(_)));
        // No members bucket, a cut-off file, garbage.
        let f = file(4, 2, &[(2, leaf(2, &[(BUCKET_LEAF, b"key", bucket(3, None))]))]);
        assert!(matches!(read(&f, 4096), Members::Unread(_)));
        assert!(matches!(read(&f[..4096 * 2 + 10], 4096), Members::Unread(_)));
        assert!(matches!(read(&[0xffu8; 20_000], 4096), Members::Unread(_)));
    }

    /// An etcd revision key and a put's value carrying `mod` as its mod_revision.
    fn put(main: i64, sub: i64, m: i64) -> (u32, Vec<u8>, Vec<u8>) {
        let mut k = main.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&sub.to_be_bytes());
        let mut v = vec![0x0a, 1, b'k', 0x10, 2];
        v.push(0x18);
        let mut m = m as u64;
        while m >= 0x80 {
            v.push((m as u8 & 0x7f) | 0x80);
            m >>= 7;
        }
        v.push(m as u8);
        (0, k, v)
    }

    fn el(v: &[(u32, Vec<u8>, Vec<u8>)]) -> Vec<(u32, &[u8], Vec<u8>)> {
        v.iter().map(|(f, k, v)| (*f, &k[..], v.clone())).collect()
    }

    fn revision(f: &[u8], piece: usize) -> Result<i64, String> {
        let mut r = RevisionReader::new();
        for c in f.chunks(piece) {
            r.write(c);
        }
        r.finish()
    }

    #[test]
    fn the_revision_is_the_highest_believed_key_or_the_finished_compaction_in_any_page_order() {
        let high = vec![put(900, 0, 900), put(901, 1, 901)];
        let low = vec![put(5, 0, 5), put(7, 0, 7)];
        // A key of revision shape whose value does not carry it (another bucket's key, a stale value) is not
        // believed; a deletion (`t`) counts.
        let mut tomb = put(950, 0, 950);
        tomb.1.push(b't');
        tomb.2 = vec![0x0a, 1, b'k'];
        let liar = vec![put(5_000, 0, 7), tomb];
        let pages = [(2u64, leaf(2, &el(&high))), (3, leaf(3, &el(&low))), (5, leaf(5, &el(&liar)))];
        let f = file(8, 9, &pages);
        for piece in [1, 100, 4096, 1 << 20] {
            assert_eq!(revision(&f, piece), Ok(950), "piece {piece}");
        }
        // A page whose header names another id is no page start (the rest of a freed run): not read.
        let mut stale = leaf(6, &el(&[put(7_000, 0, 7_000)]));
        stale[..8].copy_from_slice(&99u64.to_le_bytes());
        let f = file(8, 9, &[(2, leaf(2, &el(&high))), (6, stale.clone())]);
        assert_eq!(revision(&f, 4096), Ok(901));
        // A restore marked compacted above its keys: the `meta` bucket (inline) names the revision.
        let meta = leaf(
            0,
            &[(0, FINISHED_COMPACT, {
                let mut v = 2_000i64.to_be_bytes().to_vec();
                v.push(b'_');
                v.extend_from_slice(&0i64.to_be_bytes());
                v
            })],
        );
        let root = leaf(4, &[(BUCKET_LEAF, b"meta", bucket(0, Some(meta)))]);
        let f = file(8, 4, &[(2, leaf(2, &el(&high))), (4, root)]);
        assert_eq!(revision(&f, 333), Ok(2_000));
        assert!(revision(&f[..100], 10).is_err(), "shorter than a page");
    }
}
