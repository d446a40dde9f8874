//! Watch responses → whole revisions, with continuity checked as they come. Pure: no etcd, no clock.
//!
//! With `fragment` on, etcd splits one large response into several; a revision is complete when a later
//! revision's event arrives, a response ends unfragmented, or a progress notification arrives. Every
//! revision has at least one event (the whole key space is watched, and etcd bumps its revision only for a
//! write that changes a key), so a revision that does not follow the last by one is a gap.

use ferry_common::segment::{Event, Revision};

/// One watch response, as the assembler needs it.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// The header's revision: for a progress notification, every revision through it was delivered.
    pub header_revision: i64,
    /// Events with their mod revision, in order.
    pub events: Vec<(i64, Event)>,
    /// More of the same response follows.
    pub fragment: bool,
    pub created: bool,
    pub canceled: bool,
    pub compact_revision: i64,
}

impl Response {
    /// A progress notification: no event, neither creating nor cancelling the watch.
    pub fn is_progress(&self) -> bool {
        self.events.is_empty() && !self.created && !self.canceled && !self.fragment
    }
}

/// What the assembler found, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    Revision(Revision),
    /// Revisions lost for good, `to` inclusive.
    Gap {
        from: i64,
        to: i64,
        reason: String,
    },
}

pub const SKIPPED: &str = "the watch skipped revisions";
pub const COMPACTED: &str = "etcd compacted them before they were watched";

pub struct Assembler {
    /// The last revision emitted (or given up as a gap).
    last: i64,
    pending: Option<Revision>,
    /// The highest revision etcd proved delivered (progress), or the last revision emitted.
    proven: i64,
    /// Duplicates dropped so far (for logs).
    pub duplicates: u64,
}

impl Assembler {
    /// Expects `from` next.
    pub fn new(from: i64) -> Self {
        Self { last: from - 1, pending: None, proven: from - 1, duplicates: 0 }
    }

    /// The revision expected next: where a new watch resumes.
    pub fn next(&self) -> i64 {
        self.last + 1
    }

    /// The highest revision known complete (none pending above it).
    pub fn proven(&self) -> i64 {
        self.proven
    }

    /// The watch broke: a half-received revision comes again from the new watch.
    pub fn interrupted(&mut self) {
        self.pending = None;
    }

    /// Feeds one response; `now_ms` stamps revisions completed by it.
    pub fn push(&mut self, resp: Response, now_ms: i64, out: &mut Vec<Assembled>) {
        if resp.canceled {
            self.flush(out);
            if resp.compact_revision > 0 && resp.compact_revision >= self.next() {
                // Conservative: the compaction revision itself may be gone too.
                out.push(Assembled::Gap { from: self.next(), to: resp.compact_revision, reason: COMPACTED.into() });
                self.last = resp.compact_revision;
                self.proven = self.proven.max(self.last);
            }
            return;
        }
        if resp.is_progress() {
            self.flush(out);
            if resp.header_revision > self.last {
                // etcd says everything through it was sent, yet revisions are missing.
                out.push(Assembled::Gap { from: self.next(), to: resp.header_revision, reason: SKIPPED.into() });
                self.last = resp.header_revision;
            }
            self.proven = self.proven.max(resp.header_revision);
            return;
        }
        for (rev, event) in resp.events {
            match &mut self.pending {
                Some(p) if p.revision == rev => p.events.push(event),
                Some(p) if rev < p.revision => self.duplicates += 1,
                _ if rev <= self.last => self.duplicates += 1,
                _ => {
                    self.flush(out);
                    self.pending = Some(Revision { revision: rev, time_ms: now_ms, events: vec![event] });
                }
            }
        }
        if !resp.fragment {
            self.flush(out);
        }
    }

    fn flush(&mut self, out: &mut Vec<Assembled>) {
        let Some(p) = self.pending.take() else { return };
        if p.revision > self.next() {
            out.push(Assembled::Gap { from: self.next(), to: p.revision - 1, reason: SKIPPED.into() });
        }
        self.last = p.revision;
        self.proven = self.proven.max(p.revision);
        out.push(Assembled::Revision(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::segment::EventKind;

    fn ev(key: &str) -> Event {
        Event { kind: EventKind::Put, key: key.into(), value: b"v".to_vec(), create_revision: 1, version: 1, lease: 0 }
    }

    fn resp(events: &[(i64, &str)], fragment: bool) -> Response {
        Response {
            header_revision: events.last().map_or(0, |e| e.0),
            events: events.iter().map(|(r, k)| (*r, ev(k))).collect(),
            fragment,
            ..Default::default()
        }
    }

    fn revs(out: &[Assembled]) -> Vec<(i64, usize)> {
        out.iter()
            .filter_map(|a| match a {
                Assembled::Revision(r) => Some((r.revision, r.events.len())),
                Assembled::Gap { .. } => None,
            })
            .collect()
    }

    #[test]
    fn duplicates_are_dropped_and_whole_responses_end_revisions() {
        let mut a = Assembler::new(5);
        let mut out = Vec::new();
        a.push(resp(&[(5, "/a"), (5, "/b"), (6, "/c")], false), 1, &mut out);
        a.push(resp(&[(4, "/old"), (6, "/c"), (7, "/d")], false), 2, &mut out);
        assert_eq!(revs(&out), [(5, 2), (6, 1), (7, 1)]);
        assert_eq!(a.duplicates, 2);
        assert_eq!((a.next(), a.proven()), (8, 7));
    }

    #[test]
    fn fragments_are_joined_into_one_revision() {
        let mut a = Assembler::new(10);
        let mut out = Vec::new();
        a.push(resp(&[(10, "/a"), (10, "/b")], true), 1, &mut out);
        assert!(out.is_empty(), "a fragment does not end its revision");
        a.push(resp(&[(10, "/c")], true), 1, &mut out);
        a.push(resp(&[(10, "/d")], false), 1, &mut out);
        assert_eq!(revs(&out), [(10, 4)]);
        // A fragment ended by a later revision, then by a progress notification.
        a.push(resp(&[(11, "/a"), (12, "/b")], true), 1, &mut out);
        assert_eq!(revs(&out), [(10, 4), (11, 1)]);
        a.push(Response { header_revision: 12, ..Default::default() }, 1, &mut out);
        assert_eq!(revs(&out), [(10, 4), (11, 1), (12, 1)]);
        assert_eq!(a.proven(), 12);
    }

    #[test]
    fn a_half_revision_is_forgotten_when_the_watch_breaks() {
        let mut a = Assembler::new(10);
        let mut out = Vec::new();
        a.push(resp(&[(10, "/a")], true), 1, &mut out);
        a.interrupted();
        a.push(resp(&[(10, "/a"), (10, "/b")], false), 1, &mut out);
        assert_eq!(revs(&out), [(10, 2)]);
    }

    #[test]
    fn skipped_revisions_are_a_gap_and_the_watch_goes_on() {
        let mut a = Assembler::new(5);
        let mut out = Vec::new();
        a.push(resp(&[(5, "/a"), (9, "/b")], false), 1, &mut out);
        assert_eq!(
            out,
            [
                Assembled::Revision(Revision { revision: 5, time_ms: 1, events: vec![ev("/a")] }),
                Assembled::Gap { from: 6, to: 8, reason: SKIPPED.into() },
                Assembled::Revision(Revision { revision: 9, time_ms: 1, events: vec![ev("/b")] }),
            ]
        );
        // A progress past what was delivered is a gap too.
        out.clear();
        a.push(Response { header_revision: 11, ..Default::default() }, 1, &mut out);
        assert_eq!(out, [Assembled::Gap { from: 10, to: 11, reason: SKIPPED.into() }]);
        assert_eq!(a.next(), 12);
    }

    #[test]
    fn a_compacted_start_is_a_gap_through_the_compaction_revision() {
        let mut a = Assembler::new(5);
        let mut out = Vec::new();
        let cancel = Response { canceled: true, compact_revision: 20, header_revision: 30, ..Default::default() };
        a.push(cancel, 1, &mut out);
        assert_eq!(out, [Assembled::Gap { from: 5, to: 20, reason: COMPACTED.into() }]);
        assert_eq!(a.next(), 21, "the watch resumes after the compaction revision");
        // A progress at the current revision is not a gap when nothing was missed.
        out.clear();
        a.push(resp(&[(21, "/a")], false), 1, &mut out);
        a.push(Response { header_revision: 21, ..Default::default() }, 1, &mut out);
        assert_eq!(revs(&out), [(21, 1)]);
        assert_eq!(out.len(), 1);
    }
}
