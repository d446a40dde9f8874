//! Before a backup: do the members hold the same data? A member whose key space silently diverged (etcd
//! corruption) takes a snapshot that restores perfectly and is wrong; a restore drill cannot see it.
//!
//! Every connected member's agent is asked for etcd's `HashKV` at one common revision. First choice: a
//! compaction revision whose hash at least two members hold (etcd 3.5.5+ hashes its key space while it
//! compacts, in small batches, and keeps the last ten): asking there costs etcd nothing. Any other `HashKV`
//! hashes the whole key space while holding etcd's backend — seconds of stalled writes on a large database —
//! so without such a compaction the lowest revision the members reported is asked, and each agent answers it
//! only for a database within its scan limit (`--hashkv-scan-limit-mib`), else says it skipped. Hashes are
//! compared only between members of the majority's etcd cluster ID (an agent pointed at an etcd holding other
//! data is caught by its cluster ID alone) and with the same compaction behind them. A member outside the
//! majority is *diverged* and is never chosen for a backup. Without a strict majority nothing is excluded
//! (there is nobody to believe), but the disagreement is reported. Members that do not answer, or skip, are
//! reported as not compared, not guessed.

use std::collections::HashMap;
use std::time::Duration;

use ferry_common::protocol::{expect_frame, write_frame, HashKvReply, HashKvResult, JobRequest};
use tokio_util::sync::CancellationToken;

use crate::agents::LiveAgent;

/// How long one member may take to answer (its agent waits up to 15 s for etcd's HashKV). It bounds how long a
/// hung or hostile agent can hold up a backup: it is then reported unreachable, and the backup goes on.
const ASK_TIMEOUT: Duration = Duration::from_secs(20);
/// Rounds at newer revisions after a compaction raced the check.
const ROUNDS: usize = 3;

/// The outcome of one check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Divergence {
    /// The revision compared at (0: no comparison was possible).
    pub revision: i64,
    /// Members whose data differs from the majority's, with why.
    pub diverged: Vec<(String, String)>,
    /// Members that did not answer, with why.
    pub unreachable: Vec<(String, String)>,
    /// Why no verdict was reached, when the members disagree without a majority.
    pub inconclusive: Option<String>,
    /// Members that agree with the majority.
    pub agreeing: Vec<String>,
    /// The database sizes the members' answers carried (fresher than their reports), by member.
    pub db_sizes: Vec<(String, i64)>,
}

impl Divergence {
    /// Whether any hashes were compared (a verdict, even a disagreement, rather than nothing asked or heard).
    pub fn compared(&self) -> bool {
        !self.agreeing.is_empty() || !self.diverged.is_empty()
    }

    /// Whether `member` is excluded from backups.
    pub fn is_diverged(&self, member: &str) -> bool {
        self.diverged.iter().any(|(m, _)| m == member)
    }

    /// One line for the status: empty when every answering member agrees.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (m, why) in &self.diverged {
            parts.push(format!("member {m} diverged: {why}"));
        }
        if let Some(i) = &self.inconclusive {
            parts.push(i.clone());
        }
        parts.join("; ")
    }
}

/// Asks every agent in `agents` (the cluster's connected ones that reach etcd) and judges their answers.
pub async fn check(agents: &[LiveAgent], cancel: &CancellationToken) -> Divergence {
    let facts: Vec<&ferry_common::protocol::EtcdFacts> =
        agents.iter().filter_map(|a| a.facts.as_ref().filter(|f| f.error.is_none())).collect();
    if let Some(revision) = common_compaction(&facts) {
        let replies = tokio::select! {
            r = ask_all(agents, revision) => r,
            () = cancel.cancelled() => return Divergence::default(),
        };
        return judge(revision, &replies);
    }
    // Revisions of 0 or below are no revision: one member saying 0 must not turn the check off for all.
    let Some(mut revision) = facts.iter().map(|f| f.revision).filter(|r| *r > 0).min() else {
        let inconclusive = (!agents.is_empty()).then(|| "not compared: no member reported a revision above 0".into());
        return Divergence { inconclusive, ..Default::default() };
    };
    let mut replies = Vec::new();
    for _ in 0..ROUNDS {
        if revision <= 0 {
            break;
        }
        replies = tokio::select! {
            r = ask_all(agents, revision) => r,
            () = cancel.cancelled() => return Divergence::default(),
        };
        if !needs_another_round(&replies) {
            break;
        }
        // Compacted (or a compaction half-applied): the lowest revision every member has now.
        let now =
            replies.iter().filter_map(|(_, r)| r.as_ref().ok()).map(|r| r.current_revision).filter(|r| *r > 0).min();
        match now {
            Some(n) if n > revision => revision = n,
            _ => break,
        }
    }
    judge(revision, &replies)
}

/// The newest compaction revision whose hash the most members hold, when at least two hold one. An agent's
/// list is its word: revisions above its reported revision, or beyond the ten etcd keeps, are not believed.
fn common_compaction(facts: &[&ferry_common::protocol::EtcdFacts]) -> Option<i64> {
    let mut held: HashMap<i64, usize> = HashMap::new();
    for f in facts {
        let mut own: Vec<i64> = believed_compactions(f).collect();
        own.sort_unstable();
        own.dedup();
        for r in own {
            *held.entry(r).or_default() += 1;
        }
    }
    held.into_iter().filter(|(_, n)| *n >= 2).max_by_key(|(r, n)| (*n, *r)).map(|(r, _)| r)
}

/// The compactions whose hash a member's agent says its etcd holds, as far as they are believed: above 0, not
/// above its reported revision, the newest ten (etcd keeps no more). Newest first.
pub(crate) fn believed_compactions(f: &ferry_common::protocol::EtcdFacts) -> impl Iterator<Item = i64> + '_ {
    f.hashed_compactions.iter().rev().take(10).copied().filter(|r| *r > 0 && *r <= f.revision)
}

/// Asks every agent at once; answers in the agents' order. Also the restore drill's comparison.
pub(crate) async fn ask_all(agents: &[LiveAgent], revision: i64) -> Vec<(String, Result<HashKvReply, String>)> {
    let mut set = tokio::task::JoinSet::new();
    for (i, a) in agents.iter().enumerate() {
        let a = a.clone();
        set.spawn(async move { (i, a.member.clone(), ask(&a, revision).await) });
    }
    let mut out: Vec<(usize, String, Result<HashKvReply, String>)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(answer) = joined {
            out.push(answer);
        }
    }
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, m, r)| (m, r)).collect()
}

/// One agent's answer, or why there was none.
async fn ask(agent: &LiveAgent, revision: i64) -> Result<HashKvReply, String> {
    let asked = async {
        let (mut send, mut recv) = agent.conn.open_bi().await.map_err(|e| format!("open stream: {e}"))?;
        write_frame(&mut send, &JobRequest::HashKv { revision }).await.map_err(|e| format!("send request: {e}"))?;
        let _ = send.finish();
        expect_frame::<_, HashKvReply>(&mut recv).await.map_err(|e| format!("read answer: {e}"))
    };
    match tokio::time::timeout(ASK_TIMEOUT, asked).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", ASK_TIMEOUT.as_secs())),
    }
}

type Replies = [(String, Result<HashKvReply, String>)];

fn needs_another_round(replies: &Replies) -> bool {
    let hashed = replies.iter().filter_map(|(_, r)| match r {
        Ok(HashKvReply { result: HashKvResult::Hash { compact_revision, .. }, .. }) => Some(*compact_revision),
        _ => None,
    });
    let compacts: std::collections::HashSet<i64> = hashed.collect();
    compacts.len() > 1
        || replies.iter().any(|(_, r)| matches!(r, Ok(HashKvReply { result: HashKvResult::Compacted, .. })))
}

/// The verdict over one round's answers (pure).
pub fn judge(revision: i64, replies: &Replies) -> Divergence {
    let mut d = Divergence { revision, ..Default::default() };
    d.db_sizes = replies
        .iter()
        .filter_map(|(m, r)| r.as_ref().ok().filter(|r| r.db_size > 0).map(|r| (m.clone(), r.db_size)))
        .collect();
    let mut answered: Vec<(&str, &HashKvReply)> = Vec::new();
    for (member, r) in replies {
        match r {
            Ok(reply) => match &reply.result {
                HashKvResult::Failed { error } => d.unreachable.push((member.clone(), bounded(error))),
                HashKvResult::Skipped { why } => d.unreachable.push((member.clone(), bounded(why))),
                _ => answered.push((member, reply)),
            },
            Err(e) => d.unreachable.push((member.clone(), e.clone())),
        }
    }
    // The etcd cluster ID first: a strict majority of the answering members sets it.
    d.unreachable.sort();
    let Some(cluster_id) = strict_majority(answered.iter().map(|(_, r)| r.cluster_id), answered.len()) else {
        if answered.len() > 1 {
            d.inconclusive = Some(format!(
                "the members report different etcd cluster IDs ({}) and no majority",
                answered.iter().map(|(m, r)| format!("{m}: {:x}", r.cluster_id)).collect::<Vec<_>>().join(", ")
            ));
        }
        return d;
    };
    let mut same = Vec::new();
    for (member, r) in answered {
        if r.cluster_id == cluster_id {
            same.push((member, r));
        } else {
            d.diverged.push((
                member.to_string(),
                format!(
                    "its agent reaches etcd cluster {:x}, the others {cluster_id:x}: the agent is pointed at another etcd cluster",
                    r.cluster_id
                ),
            ));
        }
    }
    // Then the hashes, among members that could hash at this revision with the same compaction behind them:
    // a hash etcd kept from compacting names the compaction before; one computed afresh (a member that
    // restarted since) names this one, and covers other key versions.
    let hashed: Vec<(&str, (u32, i64))> = same
        .iter()
        .filter_map(|(m, r)| match r.result {
            HashKvResult::Hash { hash, compact_revision } => Some((*m, (hash, compact_revision))),
            _ => None,
        })
        .collect();
    for (m, r) in &same {
        if !matches!(r.result, HashKvResult::Hash { .. }) {
            d.unreachable.push((m.to_string(), format!("could not hash at revision {revision}: {:?}", r.result)));
        }
    }
    let base = most_common(hashed.iter().map(|(_, (_, c))| *c));
    let mut hashes = Vec::new();
    for (m, (hash, compact)) in hashed {
        if Some(compact) == base {
            hashes.push((m, (hash, compact)));
        } else {
            d.unreachable.push((
                m.to_string(),
                format!(
                    "not compared: its hash at revision {revision} covers key versions from compaction {compact}, \
                     the others' from {}",
                    base.unwrap_or_default()
                ),
            ));
        }
    }
    match strict_majority(hashes.iter().map(|(_, h)| *h), hashes.len()) {
        Some(majority) => {
            for (m, h) in &hashes {
                if *h == majority {
                    d.agreeing.push(m.to_string());
                } else {
                    d.diverged.push((
                        m.to_string(),
                        format!(
                            "HashKV at revision {revision} is {:08x}, the majority's {:08x}: its key space differs",
                            h.0, majority.0
                        ),
                    ));
                }
            }
        }
        None if hashes.len() > 1 => {
            d.inconclusive = Some(format!(
                "HashKV at revision {revision} differs between members with no majority ({})",
                hashes.iter().map(|(m, h)| format!("{m}: {:08x}", h.0)).collect::<Vec<_>>().join(", ")
            ));
        }
        None => d.agreeing.extend(hashes.iter().map(|(m, _)| m.to_string())),
    }
    d.diverged.sort();
    d.unreachable.sort();
    d.agreeing.sort();
    d
}

/// An agent's words as the status and the log keep them: at most 300 characters.
pub(crate) fn bounded(s: &str) -> String {
    match s.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// The most common value (the largest among equals).
pub(crate) fn most_common<T: Eq + std::hash::Hash + Ord + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: HashMap<T, usize> = HashMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(v, n)| (*n, *v)).map(|(v, _)| v)
}

/// The value more than half of `total` share, if any.
fn strict_majority<T: Eq + std::hash::Hash + Copy>(values: impl Iterator<Item = T>, total: usize) -> Option<T> {
    let mut counts: HashMap<T, usize> = HashMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts.into_iter().find(|(_, n)| *n * 2 > total).map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashed(cluster_id: u64, hash: u32) -> Result<HashKvReply, String> {
        Ok(HashKvReply {
            member_id: 1,
            cluster_id,
            current_revision: 100,
            db_size: 1 << 20,
            result: HashKvResult::Hash { hash, compact_revision: 5 },
        })
    }

    fn r(m: &str, x: Result<HashKvReply, String>) -> (String, Result<HashKvReply, String>) {
        (m.to_string(), x)
    }

    #[test]
    fn the_member_outside_the_majority_is_diverged_and_the_unreachable_are_reported() {
        let d = judge(
            50,
            &[r("a", hashed(7, 1)), r("b", hashed(7, 1)), r("c", hashed(7, 2)), r("d", Err("no answer".into()))],
        );
        assert_eq!(d.diverged.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(d.unreachable.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["d"]);
        assert_eq!(d.agreeing, ["a", "b"]);
        assert!(d.summary().contains("member c diverged"), "{}", d.summary());
    }

    #[test]
    fn another_cluster_id_is_diverged_whatever_its_hash() {
        let d = judge(50, &[r("a", hashed(7, 1)), r("b", hashed(7, 1)), r("c", hashed(9, 1))]);
        assert!(d.is_diverged("c") && d.diverged[0].1.contains("another etcd cluster"), "{d:?}");
    }

    #[test]
    fn a_member_whose_hash_covers_another_compaction_or_that_skipped_is_not_compared_not_diverged() {
        let fresh = Ok(HashKvReply {
            member_id: 1,
            cluster_id: 7,
            current_revision: 100,
            db_size: 1 << 20,
            result: HashKvResult::Hash { hash: 9, compact_revision: 50 },
        });
        let skipped = Ok(HashKvReply {
            member_id: 1,
            cluster_id: 7,
            current_revision: 100,
            db_size: 1 << 20,
            result: HashKvResult::Skipped { why: "too big".into() },
        });
        let d = judge(50, &[r("a", hashed(7, 1)), r("b", hashed(7, 1)), r("c", fresh), r("d", skipped)]);
        assert!(d.diverged.is_empty(), "{d:?}");
        assert_eq!(d.agreeing, ["a", "b"]);
        assert_eq!(d.unreachable.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["c", "d"]);
        assert!(d.unreachable[0].1.contains("from compaction 50, the others' from 5"), "{d:?}");
    }

    fn facts(revision: i64, hashed_compactions: Vec<i64>) -> ferry_common::protocol::EtcdFacts {
        ferry_common::protocol::EtcdFacts { revision, hashed_compactions, ..Default::default() }
    }

    #[test]
    fn the_compaction_most_members_hold_is_chosen_and_a_lone_or_impossible_claim_is_not() {
        let (a, b, c) = (facts(900, vec![100, 400, 700]), facts(900, vec![400, 700]), facts(900, vec![700, 800]));
        assert_eq!(common_compaction(&[&a, &b, &c]), Some(700));
        // 800 is c's alone; 5000 is above the revision its agent reports.
        let liar = facts(900, vec![5000]);
        assert_eq!(common_compaction(&[&liar, &facts(6000, vec![5000])]), None);
        assert_eq!(common_compaction(&[&a, &facts(900, vec![])]), None);
        assert_eq!(common_compaction(&[&a, &b]), Some(700));
    }

    #[test]
    fn a_tie_excludes_nobody_but_says_so() {
        let d = judge(50, &[r("a", hashed(7, 1)), r("b", hashed(7, 2))]);
        assert!(d.diverged.is_empty() && d.inconclusive.is_some(), "{d:?}");
        let lone = judge(50, &[r("a", hashed(7, 1))]);
        assert_eq!((lone.agreeing.len(), lone.inconclusive), (1, None));
    }
}
