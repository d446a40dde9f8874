//! What a restore to a point would change, counted by key prefix (for Kubernetes: by resource type), from
//! the change log after the point alone: a key's first change after the point says whether it existed at
//! the point, its last whether it exists now.

use std::collections::{BTreeMap, HashMap};

use ferry_common::segment::{EventKind, Revision};

/// Per prefix: keys a restore would bring back (deleted since), revert (changed since) and remove (created
/// since).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub deleted: u64,
    pub changed: u64,
    pub created: u64,
}

/// Folds the revisions after a point into each key's fate.
#[derive(Debug, Default)]
pub struct Diff {
    point: i64,
    /// key → (existed at the point, exists now)
    keys: HashMap<Vec<u8>, (bool, bool)>,
}

impl Diff {
    pub fn new(point: i64) -> Self {
        Self { point, keys: HashMap::new() }
    }

    /// Adds one revision (revisions at or before the point are ignored).
    pub fn add(&mut self, rev: &Revision) {
        if rev.revision <= self.point {
            return;
        }
        for e in &rev.events {
            let now = e.kind == EventKind::Put;
            let point = self.point;
            self.keys
                .entry(e.key.clone())
                .and_modify(|k| k.1 = now)
                .or_insert_with(|| (e.kind == EventKind::Delete || e.create_revision <= point, now));
        }
    }

    /// Counts per prefix, by prefix.
    pub fn counts(&self) -> BTreeMap<String, Counts> {
        let mut out: BTreeMap<String, Counts> = BTreeMap::new();
        for (k, (then, now)) in &self.keys {
            let c = out.entry(prefix_of(k)).or_default();
            match (then, now) {
                (true, false) => c.deleted += 1,
                (true, true) => c.changed += 1,
                (false, true) => c.created += 1,
                (false, false) => {}
            }
        }
        out.retain(|_, c| *c != Counts::default());
        out
    }
}

/// `/registry/pods/` for `/registry/pods/ns/name`, `/foo/` for `/foo/bar`, `(other)` for a key without a
/// leading path segment.
pub fn prefix_of(key: &[u8]) -> String {
    let s = String::from_utf8_lossy(key);
    if let Some(rest) = s.strip_prefix("/registry/") {
        if let Some(end) = rest.find('/') {
            return format!("/registry/{}/", &rest[..end]);
        }
    }
    match s.strip_prefix('/').and_then(|r| r.find('/')) {
        Some(end) => format!("/{}/", &s[1..=end]),
        None => "(other)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::segment::Event;

    fn ev(kind: EventKind, key: &str, create: i64) -> Event {
        Event { kind, key: key.into(), value: b"v".to_vec(), create_revision: create, version: 1, lease: 0 }
    }

    fn rev(revision: i64, events: Vec<Event>) -> Revision {
        Revision { revision, time_ms: 0, events }
    }

    #[test]
    fn a_keys_fate_after_the_point_is_counted_once_by_its_prefix() {
        let mut d = Diff::new(10);
        d.add(&rev(9, vec![ev(EventKind::Put, "/registry/pods/a/ignored", 9)]));
        d.add(&rev(11, vec![ev(EventKind::Delete, "/registry/pods/a/gone", 0)]));
        d.add(&rev(
            12,
            vec![ev(EventKind::Put, "/registry/pods/a/new", 12), ev(EventKind::Put, "/registry/pods/a/old", 3)],
        ));
        d.add(&rev(
            13,
            vec![ev(EventKind::Put, "/registry/pods/a/old", 3), ev(EventKind::Put, "/registry/pods/a/brief", 13)],
        ));
        d.add(&rev(14, vec![ev(EventKind::Delete, "/registry/pods/a/brief", 0), ev(EventKind::Put, "/x/y", 2)]));
        d.add(&rev(15, vec![ev(EventKind::Put, "/registry/pods/a/gone", 15), ev(EventKind::Delete, "k", 0)]));
        let c = d.counts();
        // gone: deleted then re-created: it existed and exists: changed. old: changed twice: changed once.
        assert_eq!(c["/registry/pods/"], Counts { deleted: 0, changed: 2, created: 1 });
        assert_eq!(c["/x/"], Counts { changed: 1, ..Default::default() });
        assert_eq!(c["(other)"], Counts { deleted: 1, ..Default::default() });
        assert_eq!(c.len(), 3, "a key created and deleted after the point changes nothing: {c:?}");
        assert_eq!(prefix_of(b"/registry/apps/deployments"), "/registry/apps/");
    }
}
