//! Members whose backups the store keeps refusing are taken out of rotation for a while.
//!
//! A refused commit (the stored parts are not what was announced, the object fails its checks, a part is
//! announced twice with other content) is what a stolen node probing the coordinator looks like; an honest
//! member fails that way only when its node is broken. After [`STRIKES`] such refusals in a row a member is
//! not chosen for [`OUT_FOR`], `ferry_member_out_of_rotation` is 1 and the alert
//! `FerryMemberOutOfRotation` fires. A store that cannot be reached is no strike: it is nobody's lie.
//!
//! Kept in memory by the leader: a new leader, or a restarted coordinator, starts with a clean slate (and
//! a member that goes on lying is out again after three more refusals).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// Refused backups in a row that take a member out of rotation.
pub const STRIKES: u32 = 3;
/// How long a member stays out.
pub const OUT_FOR: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Record {
    strikes: u32,
    out_until: Option<Instant>,
}

/// Per `(cluster, member)`: refusals in a row, and until when the member is out.
#[derive(Default)]
pub struct Quarantine(Mutex<HashMap<(String, String), Record>>);

impl Quarantine {
    /// A backup from `member` was refused; true when this takes it out of rotation.
    pub fn refused(&self, cluster: &str, member: &str) -> bool {
        self.refused_at(cluster, member, Instant::now())
    }

    fn refused_at(&self, cluster: &str, member: &str, now: Instant) -> bool {
        let mut all = lock(&self.0);
        let r = all.entry((cluster.to_string(), member.to_string())).or_default();
        r.strikes += 1;
        if r.strikes >= STRIKES && r.out_until.is_none_or(|t| t <= now) {
            r.out_until = Some(now + OUT_FOR);
            return true;
        }
        false
    }

    /// A backup from `member` was committed: its record is cleared.
    pub fn committed(&self, cluster: &str, member: &str) {
        lock(&self.0).remove(&(cluster.to_string(), member.to_string()));
    }

    /// When `member` is out of rotation, how long it stays out.
    pub fn out_for(&self, cluster: &str, member: &str) -> Option<Duration> {
        self.out_for_at(cluster, member, Instant::now())
    }

    fn out_for_at(&self, cluster: &str, member: &str, now: Instant) -> Option<Duration> {
        let mut all = lock(&self.0);
        let key = (cluster.to_string(), member.to_string());
        let until = all.get(&key)?.out_until?;
        if until <= now {
            // Served its time: it may be tried again, and three more refusals take it out again.
            all.remove(&key);
            return None;
        }
        Some(until - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_refusals_in_a_row_take_a_member_out_for_a_while() {
        let q = Quarantine::default();
        let t0 = Instant::now();
        assert!(!q.refused_at("c", "m1", t0));
        q.committed("c", "m1");
        assert!(!q.refused_at("c", "m1", t0));
        assert!(!q.refused_at("c", "m1", t0));
        assert_eq!(q.out_for_at("c", "m1", t0), None, "a commit in between starts the count again");
        assert!(q.refused_at("c", "m1", t0));
        assert_eq!(q.out_for_at("c", "m1", t0), Some(OUT_FOR));
        assert_eq!(q.out_for_at("c", "m2", t0), None, "other members are not touched");
        assert_eq!(q.out_for_at("other", "m1", t0), None, "nor the same name in another cluster");
        assert_eq!(q.out_for_at("c", "m1", t0 + OUT_FOR), None, "out for OUT_FOR, then tried again");
        assert!(!q.refused_at("c", "m1", t0 + OUT_FOR));
    }
}
