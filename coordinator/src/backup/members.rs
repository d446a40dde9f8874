//! Which member a backup is taken from: reachable members close to the cluster's applied index first —
//! followers before the leader (so the leader keeps its capacity), rotating among followers — then the
//! lagging ones, then members whose reports no other member backs up.
//!
//! Agents report these facts, and a stolen node can lie. So nothing one member says alone decides: the
//! cluster's applied index is the *second* highest reported (one member claiming 2^64−1 does not make everyone
//! else "lagging", it makes itself unbelieved), and the leader is the member that more than one member names
//! as leader. A lone member (a one-member cluster, or only one agent connected) is believed, since there is
//! no one to check it against; it is also the only choice.

use std::collections::HashMap;
use std::sync::Mutex;

use ferry_common::protocol::EtcdFacts;

use crate::lock;

/// Members whose raft applied index trails the cluster's by more than this are tried last.
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
    let mut indexes: Vec<u64> = healthy.iter().map(|(_, f)| f.raft_applied_index).collect();
    indexes.sort_unstable_by(|a, b| b.cmp(a));
    // The second highest when there are two or more: one member alone cannot set the bar.
    let reference = indexes.get(1).or(indexes.first()).copied().unwrap_or(0);
    let believed = |f: &EtcdFacts| f.raft_applied_index <= reference.saturating_add(APPLIED_INDEX_TOLERANCE);
    let close =
        |f: &EtcdFacts| believed(f) && reference.saturating_sub(f.raft_applied_index) <= APPLIED_INDEX_TOLERANCE;
    // The leader is whom more than one member names (or the lone member's own word).
    let leader_id = if healthy.len() < 2 {
        healthy.first().filter(|(_, f)| f.leader).map(|(_, f)| f.member_id)
    } else {
        let mut votes: HashMap<u64, usize> = HashMap::new();
        for (_, f) in &healthy {
            if f.leader_id != 0 {
                *votes.entry(f.leader_id).or_default() += 1;
            }
        }
        votes.into_iter().filter(|(_, n)| *n >= 2).max_by_key(|(_, n)| *n).map(|(id, _)| id)
    };
    let is_leader = |f: &EtcdFacts| Some(f.member_id) == leader_id || (f.leader && leader_id.is_none());
    let mut followers: Vec<&String> =
        healthy.iter().filter(|(_, f)| close(f) && !is_leader(f)).map(|(m, _)| m).collect();
    followers.sort();
    if !followers.is_empty() {
        let n = rotation % followers.len();
        followers.rotate_left(n);
    }
    let leaders = healthy.iter().filter(|(_, f)| close(f) && is_leader(f)).map(|(m, _)| m);
    let mut lagging: Vec<&(String, EtcdFacts)> =
        healthy.iter().copied().filter(|(_, f)| believed(f) && !close(f)).collect();
    lagging.sort_by_key(|(m, f)| (std::cmp::Reverse(f.raft_applied_index), m.clone()));
    let mut unbelieved: Vec<&String> = healthy.iter().filter(|(_, f)| !believed(f)).map(|(m, _)| m).collect();
    unbelieved.sort();
    followers.into_iter().chain(leaders).chain(lagging.into_iter().map(|(m, _)| m)).chain(unbelieved).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, id: u64, applied: u64, leader: u64) -> (String, EtcdFacts) {
        let f = EtcdFacts {
            member_id: id,
            raft_applied_index: applied,
            leader: id == leader,
            leader_id: leader,
            ..Default::default()
        };
        (name.into(), f)
    }

    #[test]
    fn followers_come_before_the_leader_and_rotate() {
        let members = vec![m("a", 1, 100, 1), m("b", 2, 100, 1), m("c", 3, 99, 1)];
        let rotation = Rotation::default();
        let first = order_members(&members, rotation.next("x"));
        assert_eq!(first.last().unwrap(), "a", "the leader is the last choice: {first:?}");
        let second = order_members(&members, rotation.next("x"));
        assert_ne!(first[0], second[0], "equal followers take turns");
        assert_eq!(second.last().unwrap(), "a");
    }

    #[test]
    fn lagging_and_unreachable_members_are_last_or_out() {
        let mut down = m("d", 4, 5000, 1);
        down.1.error = Some("connection refused".into());
        let members = vec![m("a", 1, 5000, 1), m("b", 2, 10, 1), m("c", 3, 5000, 1), down];
        assert_eq!(order_members(&members, 0), ["c", "a", "b"], "a lagging follower comes after the leader");
    }

    #[test]
    fn one_member_cannot_make_itself_the_choice_by_lying() {
        // "m" claims the highest possible applied index and to be a follower of someone nobody else names.
        let liar = m("m", 9, u64::MAX, 77);
        let members = vec![m("a", 1, 100, 1), m("b", 2, 100, 1), m("c", 3, 100, 1), liar.clone()];
        let order = order_members(&members, 0);
        assert_eq!(order.last().unwrap(), "m", "an applied index nobody backs up is not believed: {order:?}");
        // Claiming to be the leader does not make it one either, nor does it push the real leader first.
        let mut claims = m("m", 9, 100, 9);
        claims.1.leader = true;
        let members = vec![m("a", 1, 100, 1), m("b", 2, 100, 1), claims];
        let order = order_members(&members, 0);
        assert_eq!(order.last().unwrap(), "a", "the leader two members name goes last: {order:?}");
    }

    #[test]
    fn a_lone_member_is_believed() {
        assert_eq!(order_members(&[m("a", 1, u64::MAX, 1)], 0), ["a"]);
    }
}
