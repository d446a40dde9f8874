//! The plan of an orchestrated restore: computed once from the members' own etcd flags, the backup and the
//! highest revision the cluster was seen at, then stored and never recomputed. Pure, so it is tested here.

use std::collections::BTreeMap;

use ferry_common::protocol::MemberLayout;
use ferry_common::resources::{restore_mode, EtcdRestoreSpec, PlannedMember, RestorePlanned, Timestamp};
use ferry_common::snapshot::planned_bump;

/// What the plan is made from besides the spec.
pub struct PlanInput<'a> {
    pub restore_id: &'a str,
    pub spec: &'a EtcdRestoreSpec,
    /// Each planned member's layout, by agent member name.
    pub layouts: &'a BTreeMap<String, MemberLayout>,
    pub backup_id: &'a str,
    pub backup_revision: i64,
    pub backup_rawsize: u64,
    pub backup_keys: u64,
    pub highest_revision: i64,
    pub now: Timestamp,
}

/// The mode a spec asks for (empty: the default, `seed-join`), or why it is not one.
pub fn mode(spec: &EtcdRestoreSpec) -> Result<&'static str, String> {
    match spec.mode.as_str() {
        "" | restore_mode::SEED_JOIN => Ok(restore_mode::SEED_JOIN),
        restore_mode::ALL_MEMBERS => Ok(restore_mode::ALL_MEMBERS),
        restore_mode::REPLACE_MEMBER => Ok(restore_mode::REPLACE_MEMBER),
        other => Err(format!(
            "spec.mode {other:?} is not a restore mode: give {:?} (the default: one member restored, the others \
             added back) or {:?} (every member restored from the snapshot)",
            restore_mode::SEED_JOIN,
            restore_mode::ALL_MEMBERS
        )),
    }
}

/// Room a member needs on its data dir's disk: the restored database and a tenth more.
pub fn room_needed(rawsize: u64) -> u64 {
    rawsize.saturating_add(rawsize / 10)
}

/// Makes the plan, or says why none can be made (nothing is touched either way).
pub fn make(input: &PlanInput<'_>) -> Result<RestorePlanned, String> {
    let mode = mode(input.spec)?;
    if input.layouts.is_empty() {
        return Err("no member is left to restore: every member is declared lost".into());
    }
    let mut names = std::collections::HashSet::new();
    let mut urls = std::collections::HashSet::new();
    for (member, l) in input.layouts {
        if !names.insert(l.etcd_name.as_str()) {
            return Err(format!(
                "two members run etcd as --name {:?} (one is {member}); names must be unique",
                l.etcd_name
            ));
        }
        for u in l.peer_urls.split(',') {
            if !urls.insert(u.trim()) {
                return Err(format!("two members advertise the peer URL {u} (one is {member})"));
            }
        }
        let need = if mode == restore_mode::REPLACE_MEMBER { 0 } else { room_needed(input.backup_rawsize) };
        if l.free_bytes < need {
            return Err(format!(
                "member {member} has {} free on its data dir's disk ({}), the restored database needs {}; free \
                 space or give etcd a larger disk first. Nothing was touched",
                human(l.free_bytes),
                l.data_dir,
                human(need)
            ));
        }
    }
    let members: Vec<PlannedMember> = input
        .layouts
        .iter()
        .map(|(member, l)| PlannedMember {
            member: member.clone(),
            etcdname: l.etcd_name.clone(),
            peerurls: l.peer_urls.clone(),
        })
        .collect();
    let entry = |m: &PlannedMember| {
        m.peerurls.split(',').map(|u| format!("{}={}", m.etcdname, u.trim())).collect::<Vec<_>>().join(",")
    };
    let initialcluster = match mode {
        restore_mode::ALL_MEMBERS => members.iter().map(entry).collect::<Vec<_>>().join(","),
        _ => entry(&members[0]),
    };
    Ok(RestorePlanned {
        restoreid: input.restore_id.to_string(),
        mode: mode.to_string(),
        backup: input.backup_id.to_string(),
        backuprevision: input.backup_revision,
        backupkeys: input.backup_keys,
        members,
        lostmembers: input.spec.lostmembers.clone(),
        // etcd hashes member ids from the peer URLs and this token: new ids, a new cluster id, so a member
        // of the old cluster can never join the restored one by mistake.
        initialclustertoken: format!("ferry-{}", input.restore_id),
        initialcluster,
        highestrevision: input.highest_revision,
        bumpby: if mode == restore_mode::REPLACE_MEMBER {
            0
        } else {
            planned_bump(input.highest_revision, input.backup_revision)
        },
        createdat: input.now,
        helper: String::new(),
        backupcluster: String::new(),
    })
}

/// `--initial-cluster` for the `n`th member (0 = the seed) joining in `seed-join`: itself and those before.
pub fn joining_cluster(plan: &RestorePlanned, n: usize) -> String {
    plan.members[..=n.min(plan.members.len().saturating_sub(1))]
        .iter()
        .flat_map(|m| m.peerurls.split(',').map(move |u| format!("{}={}", m.etcdname, u.trim())))
        .collect::<Vec<_>>()
        .join(",")
}

/// `1.5 MiB`: as `ferryctl get` prints sizes.
pub fn human(bytes: u64) -> String {
    ferry_common::progress::human_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(name: &str, port: u16, free: u64) -> MemberLayout {
        MemberLayout {
            etcd_name: name.into(),
            peer_urls: format!("http://127.0.0.1:{port}"),
            data_dir: format!("/var/lib/etcd-{name}"),
            free_bytes: free,
            held_by: None,
        }
    }

    fn input<'a>(spec: &'a EtcdRestoreSpec, layouts: &'a BTreeMap<String, MemberLayout>) -> PlanInput<'a> {
        PlanInput {
            restore_id: "prod-1",
            spec,
            layouts,
            backup_id: "b1",
            backup_revision: 1000,
            backup_rawsize: 1 << 20,
            backup_keys: 10,
            highest_revision: 5000,
            now: Timestamp { seconds: 1, nanos: 0 },
        }
    }

    fn three(free: u64) -> BTreeMap<String, MemberLayout> {
        [("cp1", 1), ("cp2", 2), ("cp3", 3)]
            .into_iter()
            .map(|(m, i)| (m.to_string(), layout(&format!("etcd-{m}"), 2380 + i, free)))
            .collect()
    }

    #[test]
    fn every_member_of_all_members_gets_one_initial_cluster_and_a_bump_above_the_highest_revision() {
        let spec = EtcdRestoreSpec { backup: "latest".into(), mode: "all-members".into(), ..Default::default() };
        let layouts = three(1 << 30);
        let p = make(&input(&spec, &layouts)).unwrap();
        assert_eq!(
            p.initialcluster,
            "etcd-cp1=http://127.0.0.1:2381,etcd-cp2=http://127.0.0.1:2382,etcd-cp3=http://127.0.0.1:2383"
        );
        assert_eq!(p.initialclustertoken, "ferry-prod-1");
        assert!(p.backuprevision + p.bumpby as i64 > p.highestrevision, "{p:?}");
        assert_eq!(p.members[0].member, "cp1");
    }

    #[test]
    fn seed_join_starts_from_the_seed_alone_and_grows_one_member_at_a_time() {
        let spec = EtcdRestoreSpec { backup: "latest".into(), ..Default::default() };
        let layouts = three(1 << 30);
        let p = make(&input(&spec, &layouts)).unwrap();
        assert_eq!(p.mode, "seed-join");
        assert_eq!(p.initialcluster, "etcd-cp1=http://127.0.0.1:2381");
        assert_eq!(joining_cluster(&p, 1), "etcd-cp1=http://127.0.0.1:2381,etcd-cp2=http://127.0.0.1:2382");
    }

    #[test]
    fn a_disk_too_small_or_a_bad_mode_is_refused_before_anything_is_touched() {
        let spec = EtcdRestoreSpec { backup: "latest".into(), ..Default::default() };
        let layouts = three(1000);
        let e = make(&input(&spec, &layouts)).unwrap_err();
        assert!(e.contains("member cp1 has") && e.contains("Nothing was touched"), "{e}");
        let spec = EtcdRestoreSpec { backup: "latest".into(), mode: "everything".into(), ..Default::default() };
        let e = make(&input(&spec, &three(1 << 30))).unwrap_err();
        assert!(e.contains("not a restore mode"), "{e}");
    }

    #[test]
    fn two_members_with_one_name_or_peer_url_are_refused() {
        let spec = EtcdRestoreSpec { backup: "latest".into(), ..Default::default() };
        let mut layouts = three(1 << 30);
        layouts.get_mut("cp2").unwrap().etcd_name = "etcd-cp1".into();
        assert!(make(&input(&spec, &layouts)).unwrap_err().contains("names must be unique"));
        let mut layouts = three(1 << 30);
        layouts.get_mut("cp2").unwrap().peer_urls = "http://127.0.0.1:2381".into();
        assert!(make(&input(&spec, &layouts)).unwrap_err().contains("peer URL"));
    }
}
