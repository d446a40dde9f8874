//! Which member a backup is taken from: reachable members close to the highest applied index first —
//! followers before the leader (so the leader keeps its capacity), rotating among followers — then the
//! lagging ones.

use std::collections::HashMap;
use std::sync::Mutex;

use ferry_common::protocol::EtcdFacts;

use crate::lock;

/// Members whose raft applied index trails the cluster's highest by more than this are tried last.
const APPLIED_INDEX_TOLERANCE: u64 = 1000;

/// Per cluster, how far to rotate among equally good followers: one step per backup.
#[derive(Default)]
pub struct Rotation(Mutex<HashMap<String, usize>>);

impl Rotation {
    /// The rotation for the next backup of `cluster`.
    pub fn next(&self, cluster: &str) -> usize {
        let mut r = lock(&self.0);
        let n = r.entry(cluster.to_string()).or_default();
        *n = n.wrapping_add(1);
        *n
    }
}

/// Orders members for a backup (see the module doc); unreachable members are left out.
pub fn order_members(members: &[(String, EtcdFacts)], rotation: usize) -> Vec<String> {
    let healthy: Vec<&(String, EtcdFacts)> = members.iter().filter(|(_, f)| f.error.is_none()).collect();
    let highest = healthy.iter().map(|(_, f)| f.raft_applied_index).max().unwrap_or(0);
    let close = |f: &EtcdFacts| highest.saturating_sub(f.raft_applied_index) <= APPLIED_INDEX_TOLERANCE;
    let mut followers: Vec<&String> = healthy.iter().filter(|(_, f)| close(f) && !f.leader).map(|(m, _)| m).collect();
    followers.sort();
    if !followers.is_empty() {
        let n = rotation % followers.len();
        followers.rotate_left(n);
    }
    let leaders = healthy.iter().filter(|(_, f)| close(f) && f.leader).map(|(m, _)| m);
    let mut lagging: Vec<&(String, EtcdFacts)> = healthy.iter().copied().filter(|(_, f)| !close(f)).collect();
    lagging.sort_by_key(|(m, f)| (std::cmp::Reverse(f.raft_applied_index), m.clone()));
    followers.into_iter().chain(leaders).chain(lagging.into_iter().map(|(m, _)| m)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, applied: u64, leader: bool) -> (String, EtcdFacts) {
        (name.into(), EtcdFacts { raft_applied_index: applied, leader, ..Default::default() })
    }

    #[test]
    fn followers_come_before_the_leader_and_rotate() {
        let members = vec![m("a", 100, true), m("b", 100, false), m("c", 99, false)];
        let rotation = Rotation::default();
        let first = order_members(&members, rotation.next("x"));
        assert_eq!(first.last().unwrap(), "a", "the leader is the last choice: {first:?}");
        let second = order_members(&members, rotation.next("x"));
        assert_ne!(first[0], second[0], "equal followers take turns");
        assert_eq!(second.last().unwrap(), "a");
    }

    #[test]
    fn lagging_and_unreachable_members_are_last_or_out() {
        let mut down = m("d", 100, false);
        down.1.error = Some("connection refused".into());
        let members = vec![m("a", 5000, true), m("b", 10, false), down];
        assert_eq!(order_members(&members, 0), ["a", "b"], "a lagging follower comes after the leader");
    }
}
