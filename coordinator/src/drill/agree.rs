//! Does a drilled backup hold what the cluster held? A member can upload a snapshot that restores perfectly
//! and is not the cluster's data (values rewritten, etcd's trailing hash recomputed): restoring it proves
//! nothing. The restored key space is hashed with etcd's own `HashKV` and compared with the hashes the
//! *other* members' etcd answer at the same revision, never with the backing-up member's word.
//!
//! First choice: a compaction after the snapshot's own and not after its revision, whose hash the other
//! members' etcd kept while compacting (asking there costs them nothing; Kubernetes compacts every 5 minutes,
//! so one exists minutes after a backup). Else the snapshot's own revision, which each agent hashes afresh
//! only within its scan limit (`--hashkv-scan-limit-mib`: a fresh `HashKV` stalls etcd's writes). Hashes are
//! compared only between key spaces compacted at the same revision.

use ferry_common::protocol::{HashKvReply, HashKvResult};

use crate::agents::LiveAgent;
use crate::backup::divergence::{ask_all, believed_compactions, bounded};
use crate::restore_check::{HashAt, Hashes};

/// What the comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agreement {
    /// At least one other member's etcd answers the same hash: the line says who, where.
    Agreed(String),
    /// Every other member that could be compared answers another hash: the backup is not the cluster's data.
    Differs(String),
    /// Nobody could be compared, and why.
    NotCompared(String),
}

/// The compactions whose hash other members said their etcd holds, ascending: where to hash the restored key
/// space. An agent's list is its word, believed as the member check believes it; a wrong one only makes the
/// comparison fail to compare.
pub fn compactions(others: &[LiveAgent]) -> Vec<i64> {
    let mut out: Vec<i64> = others.iter().filter_map(|a| a.facts.as_ref()).flat_map(believed_compactions).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Asks `others` (connected members other than the one that took the backup) at the hashes of `hashes`: the
/// compaction first, then the revision.
pub async fn compare(others: &[LiveAgent], hashes: &Hashes) -> Agreement {
    if others.is_empty() {
        return Agreement::NotCompared("no other member's agent is connected".into());
    }
    let mut why = Vec::new();
    for at in [hashes.at_compaction, hashes.at_revision].into_iter().flatten() {
        let replies = ask_all(others, at.revision).await;
        match judge(&at, &replies) {
            Agreement::NotCompared(w) => why.push(w),
            verdict => return verdict,
        }
    }
    Agreement::NotCompared(why.join("; "))
}

/// The verdict over the other members' answers at `at` (pure).
pub fn judge(at: &HashAt, replies: &[(String, Result<HashKvReply, String>)]) -> Agreement {
    let (mut agree, mut differ, mut not) = (Vec::new(), Vec::new(), Vec::new());
    for (member, reply) in replies {
        match reply {
            Ok(HashKvReply { result: HashKvResult::Hash { hash, compact_revision }, .. }) => {
                if *compact_revision != at.compact_revision {
                    not.push(format!(
                        "{member}: compacted at {compact_revision}, the snapshot at {}",
                        at.compact_revision
                    ));
                } else if *hash == at.hash {
                    agree.push(member.as_str());
                } else {
                    differ.push(format!("{member} answers {hash}"));
                }
            }
            Ok(HashKvReply { result: HashKvResult::Compacted, .. }) => not.push(format!("{member}: compacted past it")),
            Ok(HashKvReply { result: HashKvResult::FutureRevision, .. }) => {
                not.push(format!("{member}: not there yet"))
            }
            Ok(HashKvReply { result: HashKvResult::Skipped { why }, .. }) => {
                not.push(format!("{member}: {}", bounded(why)))
            }
            Ok(HashKvReply { result: HashKvResult::Failed { error }, .. }) => {
                not.push(format!("{member}: {}", bounded(error)))
            }
            Err(e) => not.push(format!("{member}: {e}")),
        }
    }
    let r = at.revision;
    if !agree.is_empty() {
        let mut line = format!("agrees with {} at revision {r} (etcd HashKV {})", agree.join(", "), at.hash);
        if !differ.is_empty() {
            line.push_str(&format!("; differs from {}", differ.join(", ")));
        }
        return Agreement::Agreed(line);
    }
    if !differ.is_empty() {
        return Agreement::Differs(format!(
            "the restored key space hashes to {} at revision {r} (etcd HashKV, compacted at {}) but {}: the backup \
             is not the data the cluster held",
            at.hash,
            at.compact_revision,
            differ.join(", ")
        ));
    }
    Agreement::NotCompared(format!("at revision {r}: {}", not.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(result: HashKvResult) -> Result<HashKvReply, String> {
        Ok(HashKvReply { member_id: 1, cluster_id: 2, current_revision: 100, db_size: 1 << 20, result })
    }

    fn hash(hash: u32, compact_revision: i64) -> Result<HashKvReply, String> {
        reply(HashKvResult::Hash { hash, compact_revision })
    }

    const AT: HashAt = HashAt { revision: 50, hash: 7, compact_revision: 20 };

    #[test]
    fn one_other_member_with_the_same_hash_and_compaction_agrees() {
        let v = judge(&AT, &[("m1".into(), hash(7, 20)), ("m2".into(), Err("no answer".into()))]);
        assert!(matches!(&v, Agreement::Agreed(l) if l.contains("m1") && l.contains("50")), "{v:?}");
    }

    #[test]
    fn another_hash_at_the_same_compaction_differs_and_another_compaction_is_not_compared() {
        let v = judge(&AT, &[("m1".into(), hash(8, 20)), ("m2".into(), hash(7, 30))]);
        assert!(matches!(&v, Agreement::Differs(l) if l.contains("m1 answers 8")), "{v:?}");
        let v = judge(&AT, &[("m2".into(), hash(7, 30)), ("m3".into(), reply(HashKvResult::Compacted))]);
        assert!(matches!(&v, Agreement::NotCompared(l) if l.contains("m2: compacted at 30")), "{v:?}");
        let v = judge(&AT, &[("m2".into(), reply(HashKvResult::Skipped { why: "over the scan limit".into() }))]);
        assert!(matches!(&v, Agreement::NotCompared(l) if l.contains("scan limit")), "{v:?}");
    }
}
