//! The check that proves the change log complete: the newest full backup F2 is rebuilt from the full before it
//! (F1) plus the log's revisions between their true revisions (read from the restored snapshots, never from
//! the manifests), and compared key by key — value, create and mod revision, version, lease — with F2 itself.
//! It catches a log that lost or repeated an event (etcd's watch bugs before 3.5.18 / 3.4.36) and a watcher
//! that invented or withheld changes: the log must replay into exactly what etcd itself stored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use ferry_common::resources::{status, LogVerification, Timestamp};
use ferry_common::segment::EventKind;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use super::index::{self, SegmentEntry};
use super::Inner;
use crate::restore_check::{restore_and_dump, KeySpace, KeyState};
use crate::store::Manifest;

/// How long each throw-away etcd may take to answer.
const ETCD_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks `cluster`'s log against its two newest full backups it spans. `Ok(None)`: nothing to check yet (no
/// two backups with the log between them, or the newest already checked).
pub(super) async fn run(
    inner: &Inner,
    cluster: &str,
    scratch_root: &Path,
    last_checked: &str,
    cancel: &CancellationToken,
) -> Result<Option<LogVerification>> {
    let deps = &inner.deps;
    let Some(head) = inner.head(cluster)? else { return Ok(None) };
    if head.start_revision == 0 {
        return Ok(None);
    }
    let backups = deps.store.list(Some(cluster), cancel).await?;
    let Some(f2) = backups.first() else { return Ok(None) };
    if f2.id == last_checked || f2.backup.revision > head.covered_revision {
        return Ok(None);
    }
    // F1: the newest older backup the log starts early enough for (its true revision is at least the one
    // recorded, so a log from `recorded + 1` covers it).
    let Some(f1) = backups[1..].iter().find(|m| m.backup.revision + 1 >= head.start_revision) else {
        return Ok(None);
    };
    let mut result = LogVerification {
        time: Some(Timestamp::now()),
        result: status::OK,
        frombackup: f1.id.clone(),
        tobackup: f2.id.clone(),
        ..Default::default()
    };
    std::fs::create_dir_all(scratch_root).with_context(|| format!("create {}", scratch_root.display()))?;
    let (t1, mut space) = dump(inner, f1, scratch_root, cancel).await.context("rebuild the older backup")?;
    let (t2, expected) = dump(inner, f2, scratch_root, cancel).await.context("rebuild the newer backup")?;
    result.fromrevision = t1;
    result.torevision = t2;
    if t2 > head.covered_revision {
        // The snapshot ran past what is covered yet: checked on a later round.
        return Ok(None);
    }
    if let Some(g) = head.gaps.iter().find(|g| g.torevision > t1 && g.fromrevision <= t2) {
        result.result = status::ERROR;
        result.error = format!(
            "the log has a gap (revisions {}..={}: {}) between the two backups; the next pair is checked",
            g.fromrevision, g.torevision, g.reason
        );
        return Ok(Some(result));
    }
    let segments: Vec<SegmentEntry> = index::segments(deps.state.as_ref(), cluster)?
        .into_iter()
        .filter(|s| s.lineage == head.lineage && s.last_revision > t1 && s.first_revision <= t2)
        .collect();
    let mut next = t1 + 1;
    for s in &segments {
        let bytes = deps.store.read_segment(cluster, &s.name, cancel).await?;
        let ids = deps.identities.clone();
        let entry = s.clone();
        let (applied, space_back) = tokio::task::spawn_blocking(move || {
            let mut space = space;
            let r = apply(&entry, &bytes, ids.as_ref(), &mut space, next, t2);
            (r, space)
        })
        .await
        .map_err(|e| anyhow!("the log check panicked: {e}"))?;
        space = space_back;
        match applied {
            Ok(n) => next = n,
            Err(e) => {
                result.result = status::ERROR;
                result.error = format!("{e:#}");
                return Ok(Some(result));
            }
        }
        if next > t2 {
            break;
        }
    }
    if next <= t2 {
        result.result = status::ERROR;
        result.error = format!("the log misses revisions {next}..={t2}");
        return Ok(Some(result));
    }
    result.keys = expected.len() as u64;
    if let Some(diff) = first_difference(&space, &expected) {
        result.result = status::ERROR;
        result.error = diff;
    }
    Ok(Some(result))
}

/// Fetches a backup into a scratch dir under `root` and reads its key space (the scratch dir is gone after).
async fn dump(inner: &Inner, m: &Manifest, root: &Path, cancel: &CancellationToken) -> Result<(i64, KeySpace)> {
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{}-log-", m.backup.cluster))
        .tempdir_in(root)
        .context("create a scratch dir")?;
    let snapshot: PathBuf = scratch.path().join("snapshot.db");
    crate::drill::fetch(&inner.deps.store, inner.deps.identities.as_ref(), m, &snapshot, cancel).await?;
    let stop = cancel.child_token();
    let _stop_if_dropped = stop.clone().drop_guard();
    tokio::task::spawn_blocking(move || {
        let r = restore_and_dump(&snapshot, scratch.path(), ETCD_ANSWER_TIMEOUT, &stop);
        drop(scratch);
        r
    })
    .await
    .map_err(|e| anyhow!("the restore panicked: {e}"))?
}

/// Applies the revisions `next..=last` of one segment to `space`; returns the next revision wanted.
fn apply(
    s: &SegmentEntry,
    bytes: &[u8],
    identities: Option<&ferry_common::encryption::Identities>,
    space: &mut KeySpace,
    mut next: i64,
    last: i64,
) -> Result<i64> {
    let opened = crate::pointintime::open_segment(&s.into(), bytes, identities)?;
    let mut failure: Option<String> = None;
    for rev in opened.revisions {
        if failure.is_some() || rev.revision < next || rev.revision > last {
            continue;
        }
        if rev.revision != next {
            failure = Some(format!("the log misses revisions {next}..{}", rev.revision));
            continue;
        }
        for e in rev.events {
            match e.kind {
                EventKind::Put => {
                    space.insert(
                        e.key,
                        KeyState {
                            value_sha256: sha2::Sha256::digest(&e.value).into(),
                            create_revision: e.create_revision,
                            mod_revision: rev.revision,
                            version: e.version,
                            lease: e.lease,
                        },
                    );
                }
                EventKind::Delete => {
                    if space.remove(&e.key).is_none() {
                        failure = Some(format!(
                            "revision {} deletes key {:?}, which the rebuilt state does not hold",
                            rev.revision,
                            String::from_utf8_lossy(&e.key)
                        ));
                    }
                }
            }
        }
        next = rev.revision + 1;
    }
    match failure {
        Some(f) => bail!(f),
        None => Ok(next),
    }
}

/// The first key where the rebuilt state and the backup differ, said for an operator.
fn first_difference(rebuilt: &KeySpace, stored: &KeySpace) -> Option<String> {
    let name = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    let mut a = rebuilt.iter().peekable();
    let mut b = stored.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some((k, _)), None) => {
                return Some(format!("key {:?} is in the rebuilt state but not in the backup", name(k)))
            }
            (None, Some((k, _))) => {
                return Some(format!("key {:?} is in the backup but not in the rebuilt state", name(k)))
            }
            (Some((ka, va)), Some((kb, vb))) => {
                if ka < kb {
                    return Some(format!("key {:?} is in the rebuilt state but not in the backup", name(ka)));
                }
                if kb < ka {
                    return Some(format!("key {:?} is in the backup but not in the rebuilt state", name(kb)));
                }
                if va != vb {
                    let what = if va.value_sha256 != vb.value_sha256 {
                        "its value".to_string()
                    } else {
                        format!(
                            "its revisions/version/lease (rebuilt create {} mod {} version {} lease {:x}, backup create {} mod {} version {} lease {:x})",
                            va.create_revision, va.mod_revision, va.version, va.lease,
                            vb.create_revision, vb.mod_revision, vb.version, vb.lease
                        )
                    };
                    return Some(format!("key {:?} differs in {what}", name(ka)));
                }
                a.next();
                b.next();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(v: u8, m: i64) -> KeyState {
        KeyState { value_sha256: [v; 32], create_revision: 1, mod_revision: m, version: 1, lease: 0 }
    }

    fn put(revision: i64, key: &str, value: &[u8], create: i64, version: i64) -> ferry_common::segment::Revision {
        ferry_common::segment::Revision {
            revision,
            time_ms: 0,
            events: vec![ferry_common::segment::Event {
                kind: EventKind::Put,
                key: key.as_bytes().to_vec(),
                value: value.to_vec(),
                create_revision: create,
                version,
                lease: 0,
            }],
        }
    }

    /// A stored segment of `revisions` and its index entry.
    fn segment(revisions: &[ferry_common::segment::Revision]) -> (SegmentEntry, Vec<u8>) {
        let mut w = ferry_common::segment::SegmentWriter::new(Vec::new());
        for r in revisions {
            w.revision(r).unwrap();
        }
        let trailer = ferry_common::segment::Trailer {
            format: 0,
            cluster: "c".into(),
            lineage: 0,
            epoch: 1,
            first_revision: 0,
            last_revision: 0,
            prev_sha256: [0; 32],
            member_id: 1,
            etcd_version: String::new(),
            records: 0,
            plain_sha256: [0; 32],
        };
        let (plain, t) = w.finish(trailer).unwrap();
        let bytes = zstd::encode_all(&plain[..], 3).unwrap();
        let entry = SegmentEntry {
            lineage: 0,
            first_revision: t.first_revision,
            last_revision: t.last_revision,
            epoch: 1,
            name: "s".into(),
            size: bytes.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            prev_sha256: hex::encode([0u8; 32]),
            events: 0,
            plain_bytes: plain.len() as u64,
            first_time_ms: 0,
            last_time_ms: 0,
            encrypted: false,
            stored_at: Timestamp::default(),
        };
        (entry, bytes)
    }

    fn state(key: &str, value: &[u8], create: i64, modr: i64, version: i64) -> (Vec<u8>, KeyState) {
        let value_sha256 = sha2::Sha256::digest(value).into();
        (
            key.as_bytes().to_vec(),
            KeyState { value_sha256, create_revision: create, mod_revision: modr, version, lease: 0 },
        )
    }

    /// The base holds /a at revision 5; the log puts /b (6), changes /a (7) and deletes /b (8). Replayed whole
    /// it rebuilds the newer backup exactly; with one event gone (the change of /a, a watch that lost it) the
    /// revisions no longer join, and with one revision's event replaced by another the state differs.
    #[test]
    fn a_log_missing_one_event_does_not_rebuild_the_backup() {
        let base: KeySpace = [state("/a", b"1", 5, 5, 1)].into();
        let newer: KeySpace = [state("/a", b"2", 5, 7, 2)].into();
        let delete_b = ferry_common::segment::Revision {
            revision: 8,
            time_ms: 0,
            events: vec![ferry_common::segment::Event {
                kind: EventKind::Delete,
                key: b"/b".to_vec(),
                value: Vec::new(),
                create_revision: 0,
                version: 0,
                lease: 0,
            }],
        };
        let whole = [put(6, "/b", b"x", 6, 1), put(7, "/a", b"2", 5, 2), delete_b.clone()];
        let (entry, bytes) = segment(&whole);
        let mut space = base.clone();
        assert_eq!(apply(&entry, &bytes, None, &mut space, 6, 8).unwrap(), 9);
        assert_eq!(first_difference(&space, &newer), None);

        // Revision 7's change of /a lost: the log jumps from 6 to 8.
        let mut w = ferry_common::segment::SegmentWriter::new(Vec::new());
        w.revision(&whole[0]).unwrap();
        assert!(w.revision(&delete_b).is_err(), "the writer itself refuses the jump");
        let (entry, bytes) = segment(&whole[..1]);
        let mut space = base.clone();
        assert_eq!(apply(&entry, &bytes, None, &mut space, 6, 8).unwrap(), 7, "the caller sees 7..=8 missing");

        // Revision 7 holds another change (a repeated put of /b instead of /a's): the states differ at /a.
        let forged = [put(6, "/b", b"x", 6, 1), put(7, "/b", b"y", 6, 2), delete_b];
        let (entry, bytes) = segment(&forged);
        let mut space = base.clone();
        assert_eq!(apply(&entry, &bytes, None, &mut space, 6, 8).unwrap(), 9);
        let diff = first_difference(&space, &newer).unwrap();
        assert!(diff.contains("\"/a\"") && diff.contains("value"), "{diff}");

        // A stored segment that is not the one indexed is refused before it is read.
        let (entry, mut bytes) = segment(&whole);
        bytes[5] ^= 1;
        let mut space = base;
        assert!(apply(&entry, &bytes, None, &mut space, 6, 8).is_err());
    }

    #[test]
    fn the_first_difference_names_the_key_and_what_differs() {
        let a: KeySpace = [(b"/a".to_vec(), k(1, 2)), (b"/b".to_vec(), k(2, 3))].into();
        assert_eq!(first_difference(&a, &a.clone()), None);
        let mut b = a.clone();
        b.insert(b"/b".to_vec(), k(9, 3));
        assert!(first_difference(&a, &b).is_some_and(|d| d.contains("\"/b\"") && d.contains("value")));
        b.remove(b"/b".as_slice());
        assert!(first_difference(&a, &b).is_some_and(|d| d.contains("not in the backup")));
        let mut c = a.clone();
        c.insert(b"/b".to_vec(), k(2, 4));
        assert!(first_difference(&a, &c).is_some_and(|d| d.contains("mod 3") && d.contains("mod 4")));
    }
}
