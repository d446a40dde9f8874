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
        let page_size = u64::from(u32_at(&self.head, PAGE_HEADER + 8));
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            self.unread = Some(format!("page size {page_size}"));
            return;
        }
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
            let (eflags, pos, ksize, vsize) =
                (u32_at(page, e), u32_at(page, e + 4) as usize, u32_at(page, e + 8) as usize, u32_at(page, e + 12));
            let k = e.saturating_add(pos);
            let v = k.saturating_add(ksize);
            let end = v.saturating_add(vsize as usize);
            if end > page.len() {
                return Err(format!("an element of page {pgid} runs past the page"));
            }
            let (key, value) = (&page[k..v], &page[v..end]);
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
}
