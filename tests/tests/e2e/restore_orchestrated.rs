//! Orchestrated restores: `ferryctl restore` brings a whole 3-member cluster back through the members' gates
//! (real etcd 3.5 under `ferry-agent gate`, real agents, the real coordinator), in both modes; the
//! coordinator killed mid-restore carries on; no client reaches a restored member before the cluster is
//! verified; a member whose agent is gone blocks the restore until it is declared lost; refusals.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::GetOptions;
use serde_json::Value;

use crate::fixtures::poll_until;
use crate::fixtures::ports::free_port;
use crate::fixtures::{assert_no_unexpected_errors, Agent, Coordinator, CoordinatorOptions, EtcdCluster, Stop};
use crate::restore::backup;

const CLUSTER: &str = "prod";
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The agents' PATH: the etcd under test's tools first, then etcd 3.5's, whose `etcdutl` bumps revisions (on
/// the 3.4 compatibility pass, etcd 3.4 has none; the Ferry image carries etcdutl 3.5 for any member).
fn agent_path() -> String {
    let tools = crate::fixtures::tools::workspace_root().join(".tools/etcd-3.5/usr/bin");
    format!("{}:{}", crate::fixtures::tools::child_path().to_string_lossy(), tools.display())
}

/// One agent per gated member, with its gate, data dir and a restore URL of its own.
async fn start_gated_agents(coordinator: &Coordinator, etcd: &EtcdCluster) -> anyhow::Result<Vec<Agent>> {
    start_gated_agents_of(coordinator, etcd, CLUSTER, &agent_path()).await
}

/// [`start_gated_agents`] as members of `cluster`, with the agents' `PATH` (where they find etcd's restore
/// tool).
async fn start_gated_agents_of(
    coordinator: &Coordinator,
    etcd: &EtcdCluster,
    cluster: &str,
    path: &str,
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for (i, member) in etcd.members().iter().enumerate() {
        let creds = coordinator.issue_agent_credentials(cluster, member.name()).await?;
        let args = vec![
            "--gate-dir".to_string(),
            etcd.gate_dir(i).display().to_string(),
            "--data-dir".into(),
            member.data_dir().display().to_string(),
            "--restore-client-url".into(),
            format!("http://127.0.0.1:{}", free_port()),
        ];
        agents.push(Agent::spawn(coordinator, &creds, member.client_url(), &args, &[("PATH", path)])?);
    }
    let names: Vec<&str> = etcd.members().iter().map(|m| m.name()).collect();
    coordinator.wait_agents_connected(cluster, &names, Duration::from_secs(30)).await?;
    Ok(agents)
}

/// Every key of the cluster with its value, read through the members' normal client URLs.
async fn keyspace(etcd: &EtcdCluster) -> anyhow::Result<HashMap<String, String>> {
    etcd.read_prefix("").await
}

/// The cluster's id and revision, as a member's normal client URL answers them.
async fn cluster_id_and_revision(etcd: &EtcdCluster) -> anyhow::Result<(u64, i64)> {
    let mut c = etcd.client().await?;
    let r = tokio::time::timeout(REQUEST_TIMEOUT, c.get("", Some(GetOptions::new().with_all_keys().with_count_only())))
        .await
        .context("count: timed out")?
        .map_err(|e| anyhow::anyhow!("count: {e:?}"))?;
    let h = r.header().context("header")?;
    Ok((h.cluster_id(), h.revision()))
}

/// `ferryctl ARGS` (a restore, given time to finish), which must succeed; the coordinator's log otherwise.
async fn restore_ok(coordinator: &Coordinator, args: &[&str]) -> anyhow::Result<crate::fixtures::ferry::CtlOutput> {
    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT + Duration::from_secs(30));
    let out = ctl.run(args).await?;
    anyhow::ensure!(
        out.success(),
        "{args:?} failed: {}\n{}\ncoordinator log:\n{}",
        out.stdout,
        out.stderr,
        crate::fixtures::logs::log_tail(coordinator.log_path(), 40)
    );
    Ok(out)
}

async fn restore_status(coordinator: &Coordinator) -> anyhow::Result<Value> {
    Ok(coordinator.ctl().get_json("etcdrestorestatus", Some(CLUSTER)).await?["spec"].clone())
}

/// The whole story in one mode: keys written, a backup, more keys written (to be lost), a refusal while
/// the cluster is healthy, then `ferryctl restore --yes --wait`: every backed-up key back, the later ones
/// gone, a new cluster id, a revision above any seen, every member serving, and a backup taken at once.
async fn restore_whole_cluster(mode: Option<&str>) -> anyhow::Result<()> {
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(500).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = start_gated_agents(&coordinator, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let at_backup = keyspace(&etcd).await?;
    let (old_id, _) = cluster_id_and_revision(&etcd).await?;
    // Written after the backup: what the restore discards.
    let mut c = etcd.client().await?;
    for i in 0..50 {
        c.put(format!("/after-backup/{i}"), "lost", None).await?;
    }
    let (_, highest) = cluster_id_and_revision(&etcd).await?;
    // Let the agents report the newest revision.
    tokio::time::sleep(Duration::from_secs(11)).await;

    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT + Duration::from_secs(30));
    let mut args = vec!["restore", CLUSTER, "--backup", &id];
    if let Some(m) = mode {
        args.extend(["--mode", m]);
    }
    let refused = ctl.run(&args).await?;
    assert!(!refused.success(), "a healthy cluster is restored only when confirmed: {}", refused.stdout);
    assert!(
        refused.stderr.contains("--yes") && refused.stderr.contains("revisions"),
        "the refusal says what would be lost and how to confirm: {}",
        refused.stderr
    );
    args.extend(["--yes", "--wait", "--timeout", "5m"]);
    let out = restore_ok(&coordinator, &args).await?;
    assert!(out.stdout.contains("done"), "{}", out.stdout);

    assert_eq!(keyspace(&etcd).await?, at_backup, "the restored keyspace is the backup's, the later writes gone");
    let (new_id, revision) = cluster_id_and_revision(&etcd).await?;
    assert_ne!(new_id, old_id, "a restored cluster has a new cluster id");
    assert!(revision > highest, "revision {revision} must be above the {highest} the cluster was seen at");
    // Every member serves on its own client URL, writes go through.
    for m in etcd.members() {
        let mut c = crate::fixtures::etcd::connect(&[m.client_url().to_string()]).await?;
        tokio::time::timeout(REQUEST_TIMEOUT, c.put("/after-restore", m.name(), None))
            .await
            .context("write after the restore")?
            .map_err(|e| anyhow::anyhow!("write through {} after the restore: {e:?}", m.name()))?;
    }
    let st = restore_status(&coordinator).await?;
    assert_eq!(st["phase"], "done", "{st:#}");
    let steps: Vec<&str> =
        st["members"].as_array().context("members")?.iter().filter_map(|m| m["step"].as_str()).collect();
    assert_eq!(steps, ["released"; 3], "{st:#}");
    assert_eq!(st["plan"]["mode"], mode.unwrap_or("seed-join"));
    // A fresh backup of the restored cluster, at once.
    let fresh = poll_until("a backup after the restore", Duration::from_secs(60), Duration::from_millis(500), || {
        let coordinator = &coordinator;
        async move {
            let b = coordinator.backups(CLUSTER).await?;
            Ok(b.iter().any(|b| b["spec"]["etcdclusterid"].as_str() == Some(&format!("{new_id:x}"))).then_some(()))
        }
    })
    .await;
    assert!(fresh.is_ok(), "no backup of the restored cluster: {fresh:?}");
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn ferryctl_restore_brings_back_every_member_in_all_members_mode() -> anyhow::Result<()> {
    restore_whole_cluster(Some("all-members")).await
}

#[tokio::test]
async fn ferryctl_restore_seeds_one_member_and_joins_the_others_by_default() -> anyhow::Result<()> {
    restore_whole_cluster(None).await
}

/// Whether a restore status has come as far as a coordinator is killed at.
type KillAt = fn(&Value) -> bool;

/// A restored member runs, unverified (all-members).
fn a_member_started(st: &Value) -> bool {
    st["members"].as_array().is_some_and(|ms| ms.iter().any(|m| m["step"] == "started"))
}

/// The seed serves and the others are being added back (seed-join).
fn mid_join(st: &Value) -> bool {
    st["phase"] == "joining" && st["members"].as_array().is_some_and(|ms| ms.iter().any(|m| m["step"] == "started"))
}

/// The coordinator SIGKILLed once a restored member runs: no client reaches it on the normal client URL
/// (it serves only on the agent's loopback restore URL until the cluster is verified); the coordinator
/// started again carries the same plan on to the end.
#[tokio::test]
async fn a_coordinator_killed_mid_restore_carries_on_and_no_client_writes_before_it_is_verified() -> anyhow::Result<()>
{
    coordinator_killed_mid_restore("all-members", a_member_started).await
}

/// The same in the default mode, killed while the other members are being added back to the seed: no member
/// is added twice (three members at the end), the plan is kept.
#[tokio::test]
async fn a_coordinator_killed_mid_join_carries_the_seed_join_on() -> anyhow::Result<()> {
    coordinator_killed_mid_restore("seed-join", mid_join).await
}

async fn coordinator_killed_mid_restore(mode: &str, kill_at: KillAt) -> anyhow::Result<()> {
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(300).await?;
    let mut coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = start_gated_agents(&coordinator, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let at_backup = keyspace(&etcd).await?;
    let ctl = coordinator.ctl();
    ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", mode, "--yes"]).await?.ok()?;
    let plan =
        poll_until("the restore to come as far as the kill", RESTORE_TIMEOUT, Duration::from_millis(100), || {
            let coordinator = &coordinator;
            async move {
                let st = restore_status(coordinator).await?;
                Ok(kill_at(&st).then(|| st["plan"].clone()))
            }
        })
        .await?;
    coordinator.kill();
    if mode == "all-members" {
        // Not verified yet: whatever member runs serves no client on its normal URL.
        for m in etcd.members() {
            let reached = async {
                let mut c = crate::fixtures::etcd::connect(&[m.client_url().to_string()]).await?;
                tokio::time::timeout(Duration::from_secs(3), c.put("/sneaked-in", "before verification", None))
                    .await?
                    .map_err(|e| anyhow::anyhow!("{e:?}"))
            }
            .await;
            assert!(reached.is_err(), "member {} took a write before the restore was verified", m.name());
        }
    }
    coordinator.restart(Stop::Kill).await?;
    let out = wait_restore_end(&coordinator).await?;
    assert_eq!(out["phase"], "done", "{out:#}");
    assert_eq!(out["plan"], plan, "the new run kept the plan it found");
    assert_eq!(keyspace(&etcd).await?, at_backup);
    let mut c = etcd.client().await?;
    let members = c.member_list().await?;
    assert_eq!(members.members().len(), 3, "no member added twice: {:?}", members.members());
    assert!(members.members().iter().all(|m| !m.is_learner()), "every member promoted: {:?}", members.members());
    Ok(())
}

async fn wait_restore_end(coordinator: &Coordinator) -> anyhow::Result<Value> {
    poll_until("the restore to end", RESTORE_TIMEOUT, Duration::from_millis(500), || async move {
        let st = restore_status(coordinator).await?;
        Ok(matches!(st["phase"].as_str(), Some("done" | "failed")).then_some(st))
    })
    .await
}

/// Replicas on a state etcd: the leader SIGKILLed with a restored member running, unverified; the replica
/// elected next carries the same plan to the end, through agents that moved to it.
#[tokio::test]
async fn a_restore_survives_the_failover_of_the_leading_replica() -> anyhow::Result<()> {
    use crate::ha::{index_of, start_replicas, wait_new_leader, TAKEOVER};
    let s3 = crate::fixtures::S3Server::start().await?;
    let state = EtcdCluster::start(3).await?;
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(300).await?;
    let (mut replicas, addresses) = start_replicas(&s3, &state, &[]).await?;
    let first = wait_new_leader(&state, None, TAKEOVER).await?;
    let lead = index_of(&addresses, &first)?;
    let _agents = start_gated_agents(&replicas[lead], &etcd).await?;
    let (id, _) = backup(&replicas[lead], CLUSTER).await?;
    let at_backup = keyspace(&etcd).await?;
    replicas[lead].ctl().run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes"]).await?.ok()?;
    let plan = poll_until("a restored member started", RESTORE_TIMEOUT, Duration::from_millis(100), || {
        let leader = &replicas[lead];
        async move {
            let st = restore_status(leader).await?;
            Ok(a_member_started(&st).then(|| st["plan"].clone()))
        }
    })
    .await?;
    replicas[lead].kill();
    let second = wait_new_leader(&state, Some(&first), TAKEOVER).await?;
    let next = index_of(&addresses, &second)?;
    let out = wait_restore_end(&replicas[next]).await?;
    assert_eq!(out["phase"], "done", "{out:#}");
    assert_eq!(out["plan"], plan, "the new leader kept the plan it found");
    assert_eq!(keyspace(&etcd).await?, at_backup);
    Ok(())
}

/// A member whose agent is gone (its node lost) blocks the restore, which says so; deleted and applied
/// again with the member declared lost, the restore is done with the two others.
#[tokio::test]
async fn a_member_whose_agent_is_gone_blocks_the_restore_until_it_is_declared_lost() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(200).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut agents = start_gated_agents(&coordinator, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let at_backup = keyspace(&etcd).await?;
    // The node of m3 is lost: its agent and etcd gone.
    agents[2].kill();
    etcd.kill_member(2);
    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT);
    ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes"]).await?.ok()?;
    let waiting = poll_until("the restore to wait for m3", Duration::from_secs(30), Duration::from_millis(200), || {
        let coordinator = &coordinator;
        async move {
            let st = restore_status(coordinator).await?;
            Ok(st["waiting"].as_str().filter(|w| w.contains("m3") && w.contains("not connected")).map(str::to_owned))
        }
    })
    .await?;
    assert!(waiting.contains("not connected"), "{waiting}");
    let st = restore_status(&coordinator).await?;
    assert_eq!(st["phase"], "pending", "nothing is held while a planned member does not answer: {st:#}");
    ctl.run(&["delete", "etcdrestore", CLUSTER]).await?.ok()?;
    let out = ctl
        .run(&[
            "restore",
            CLUSTER,
            "--backup",
            &id,
            "--mode",
            "all-members",
            "--lost",
            "m3",
            "--yes",
            "--wait",
            "--timeout",
            "4m",
        ])
        .await?;
    assert!(out.success(), "{}\n{}", out.stdout, out.stderr);
    let st = restore_status(&coordinator).await?;
    let planned: Vec<&str> =
        st["plan"]["members"].as_array().context("plan")?.iter().filter_map(|m| m["member"].as_str()).collect();
    assert_eq!(planned, ["m1", "m2"]);
    let live = crate::fixtures::etcd::read_prefix(&[etcd.member(0).client_url().to_string()], "").await?;
    assert_eq!(live, at_backup);
    Ok(())
}

/// A rebuild refused before it touched anything (here: the members' nodes have no etcdutl, so the revision
/// cannot be bumped) releases every held member: the cluster runs its old data again, nothing lost.
#[tokio::test]
async fn a_rebuild_refused_before_touching_anything_releases_every_member() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(50).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    // etcdctl 3.4 from the system, no etcdutl: a restore cannot bump the revision.
    let tools = tempfile::tempdir()?;
    std::os::unix::fs::symlink("/usr/bin/etcdctl", tools.path().join("etcdctl"))?;
    let _agents = start_gated_agents_of(&coordinator, &etcd, CLUSTER, &tools.path().display().to_string()).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let before = keyspace(&etcd).await?;
    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT);
    let out = ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes", "--wait"]).await?;
    assert!(!out.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("etcdutl")
            && out.stderr.contains("no data dir was touched and the held members were released"),
        "{}",
        out.stderr
    );
    for i in 0..3 {
        assert!(!etcd.gate(i).command()?.hold, "member {i} is released");
    }
    let back = poll_until("the old cluster serving again", Duration::from_secs(60), Duration::from_millis(500), || {
        let etcd = &etcd;
        async move { Ok(keyspace(etcd).await.ok()) }
    })
    .await?;
    assert_eq!(back, before, "the old data, untouched");
    Ok(())
}

/// Every bad request is refused with what to change, and nothing starts.
#[tokio::test]
async fn bad_restore_requests_are_refused_with_what_to_change() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(10).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = start_gated_agents(&coordinator, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let ctl = coordinator.ctl();
    let cases: [(&[&str], &str); 6] = [
        (&["restore", CLUSTER, "--backup", "no-such-backup", "--yes"], "not found"),
        (&["restore", CLUSTER, "--backup", &id, "--mode", "sideways", "--yes"], "not a restore mode"),
        (&["restore", CLUSTER, "--backup", &id, "--lost", "m9", "--yes"], "not a member"),
        (&["restore", CLUSTER, "--backup", &id, "--lost", "m1,m2,m3", "--yes"], "at least one"),
        (&["restore", "elsewhere", "--backup", &id, "--yes"], "no registered members"),
        (&["restore", CLUSTER, "--backup", &id, "--before", "2020-01-01T00:00:00Z", "--yes"], "goes with"),
    ];
    for (args, want) in cases {
        let out = ctl.run(args).await?;
        assert!(!out.success(), "`{}` was accepted", out.command);
        assert!(out.stderr.contains(want), "`{}` should say {want:?}: {}", out.command, out.stderr);
    }
    let out = ctl.run(&["restore", CLUSTER, "--before", "2020-01-01T00:00:00Z", "--yes"]).await?;
    assert!(out.stderr.contains("no backup taken before"), "{}", out.stderr);
    let out = ctl.apply_yaml(&format!(
        "metadata:\n  namespace: default\n  type: EtcdRestores.ferry.dev\n  id: {CLUSTER}\nspec:\n  backup: {id}\n  confirm: other\n"
    )).await?;
    assert!(out.stderr.contains("must be the cluster's name"), "{}", out.stderr);
    let list = ctl.list_json("etcdrestores", None).await?;
    assert!(list.is_empty(), "nothing was written: {list:#?}");
    // One at a time: a second, different restore while the first runs is refused.
    ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes"]).await?.ok()?;
    let out = ctl.run(&["restore", CLUSTER, "--backup", "latest", "--yes"]).await?;
    assert!(out.stderr.contains("under way") || out.stderr.contains("finished restore"), "{}", out.stderr);
    // A backup asked for while the restore runs is refused.
    let out = ctl.run(&["backup", "now", CLUSTER]).await?;
    if !out.success() {
        assert!(out.stderr.contains("being restored"), "{}", out.stderr);
    }
    Ok(())
}

/// A gated 3-member cluster with a backup, whose member m3's node is taken over: its real agent gone, the
/// attacker connected with its certificate.
async fn cluster_with_a_stolen_node(
) -> anyhow::Result<(EtcdCluster, Coordinator, Vec<Agent>, crate::fixtures::hostile::HostileAgent, String)> {
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(20).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut agents = start_gated_agents(&coordinator, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    agents[2].kill();
    let creds = coordinator.dir().join("credentials").join(format!("{CLUSTER}-m3"));
    let liar = crate::fixtures::hostile::HostileAgent::connect(&coordinator, &creds).await?;
    Ok((etcd, coordinator, agents, liar, id))
}

/// Answers the restore steps the coordinator sends the liar with `answer` until `stop` says enough.
async fn play_liar(
    liar: &crate::fixtures::hostile::HostileAgent,
    answer: impl Fn(&ferry_common::protocol::RestoreStep) -> ferry_common::protocol::StepMsg,
    until: Duration,
) -> Vec<String> {
    use ferry_common::protocol::{write_frame, JobRequest, RestoreStep, StepMsg};
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + until;
    while tokio::time::Instant::now() < deadline {
        let Ok(mut job) = liar.next_job(deadline.saturating_duration_since(tokio::time::Instant::now())).await else {
            break;
        };
        let JobRequest::Restore(step) = &job.request else { continue };
        seen.push(format!("{step:?}").split([' ', '(', '{']).next().unwrap_or("").to_string());
        if matches!(step, RestoreStep::Rebuild(_)) {
            // Asks for the backup, reads none of it, and claims it is rebuilt.
            let _ = write_frame(&mut job.send, &StepMsg::Progress { bytes: 0 }).await;
        }
        let _ = write_frame(&mut job.send, &answer(step)).await;
        let _ = job.send.finish();
    }
    seen
}

/// A stolen node answering `Describe` with another member's peer URL cannot steer the plan: the restore
/// fails before anything is held, and the cluster keeps serving as it was.
#[tokio::test]
async fn a_lying_member_cannot_steer_the_plan_onto_another_members_address() -> anyhow::Result<()> {
    use ferry_common::protocol::{MemberLayout, RestoreStep, StepDone, StepMsg};
    let (etcd, coordinator, _agents, liar, id) = cluster_with_a_stolen_node().await?;
    let ctl = coordinator.ctl();
    let before = keyspace(&etcd).await?;
    ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes"]).await?.ok()?;
    let stolen_url = etcd.member(0).peer_url().to_string();
    let seen = play_liar(
        &liar,
        |step| match step {
            RestoreStep::Describe => StepMsg::Done(StepDone::Described(MemberLayout {
                etcd_name: "m3".into(),
                peer_urls: stolen_url.clone(),
                data_dir: "/nowhere".into(),
                free_bytes: u64::MAX,
                held_by: None,
            })),
            _ => StepMsg::Failed { error: "not playing".into(), touched: false },
        },
        Duration::from_secs(20),
    )
    .await;
    let st = poll_until("the restore to fail", Duration::from_secs(60), Duration::from_millis(200), || {
        let coordinator = &coordinator;
        async move {
            let st = restore_status(coordinator).await?;
            Ok((st["phase"] == "failed").then_some(st))
        }
    })
    .await?;
    assert!(st["error"].as_str().is_some_and(|e| e.contains("peer URL")), "{st:#}");
    assert_eq!(seen, ["Describe"], "the liar was asked nothing else");
    for i in 0..2 {
        assert!(!etcd.gate(i).command()?.hold, "member {i} was never held");
    }
    assert_eq!(keyspace(&etcd).await?, before, "the cluster serves as before");
    Ok(())
}

/// A stolen node playing along and lying in its checks (claiming a rebuild it never did, a cluster and
/// hash of its own) cannot get the restore verified: it fails, and no member ever serves clients.
#[tokio::test]
async fn a_lying_member_cannot_get_a_restore_verified_and_nothing_serves() -> anyhow::Result<()> {
    use ferry_common::protocol::{MemberLayout, RestoreStep, RestoredMember, StepDone, StepMsg};
    let (etcd, coordinator, _agents, liar, id) = cluster_with_a_stolen_node().await?;
    let ctl = coordinator.ctl();
    ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes"]).await?.ok()?;
    let (name, url) = (etcd.member(2).name().to_string(), etcd.member(2).peer_url().to_string());
    let seen = play_liar(
        &liar,
        |step| match step {
            RestoreStep::Describe => StepMsg::Done(StepDone::Described(MemberLayout {
                etcd_name: name.clone(),
                peer_urls: url.clone(),
                data_dir: "/var/lib/etcd".into(),
                free_bytes: u64::MAX,
                held_by: None,
            })),
            RestoreStep::Hold { .. } => StepMsg::Done(StepDone::Held),
            RestoreStep::Rebuild(_) => StepMsg::Done(StepDone::Rebuilt),
            RestoreStep::Start { .. } => StepMsg::Done(StepDone::Started),
            RestoreStep::Check { revision, .. } => StepMsg::Done(StepDone::Checked(RestoredMember {
                member_id: 0xbad,
                cluster_id: 0xbad,
                revision: 1 << 40,
                has_leader: true,
                learner: false,
                leader: false,
                hash: (*revision > 0).then_some(0xbad),
                keys: (*revision > 0).then_some(1),
            })),
            _ => StepMsg::Done(StepDone::Released),
        },
        Duration::from_secs(120),
    );
    let status = poll_until("the restore to end", RESTORE_TIMEOUT, Duration::from_millis(200), || {
        let coordinator = &coordinator;
        async move {
            let st = restore_status(coordinator).await?;
            Ok(matches!(st["phase"].as_str(), Some("failed" | "done")).then_some(st))
        }
    });
    let (seen, st) = tokio::join!(seen, status);
    let st = st?;
    assert_eq!(st["phase"], "failed", "{st:#}\nliar saw {seen:?}");
    assert!(st["error"].as_str().is_some_and(|e| e.contains("verification failed")), "{st:#}");
    assert!(!seen.iter().any(|s| s == "Release"), "nobody was released: {seen:?}");
    // The honest members stay on their restore URLs: no client reaches them.
    for m in &etcd.members()[..2] {
        let reached = async {
            let mut c = crate::fixtures::etcd::connect(&[m.client_url().to_string()]).await?;
            tokio::time::timeout(Duration::from_secs(3), c.put("/sneaked-in", "x", None))
                .await?
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        }
        .await;
        assert!(reached.is_err(), "member {} serves clients after a failed restore", m.name());
    }
    Ok(())
}

/// `ferryctl member replace` under a steady put load through the other members: the member is held,
/// removed, wiped (its old data kept aside), added back as a learner, promoted and released, and it then
/// holds every write acknowledged meanwhile. A replacement that would cost the cluster its quorum is refused.
#[tokio::test]
async fn member_replace_under_load_loses_no_write_and_never_costs_quorum() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = start_gated_agents(&coordinator, &etcd).await?;
    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT);
    let out = ctl.run(&["member", "replace", CLUSTER, "m3"]).await?;
    assert!(out.stderr.contains("is healthy") && out.stderr.contains("--yes"), "{}", out.stderr);

    // Writes through m1 and m2 only, for as long as the replacement runs; each acknowledged key is recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls = vec![etcd.member(0).client_url().to_string(), etcd.member(1).client_url().to_string()];
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut c = crate::fixtures::etcd::connect(&urls).await?;
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("/load/{i:08}");
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), c.put(key.clone(), "v", None)).await {
                    acked.push(key);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(acked)
        })
    };
    let out = ctl.run(&["member", "replace", CLUSTER, "m3", "--yes", "--wait", "--timeout", "4m"]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await??;
    assert!(out.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(acked.len() > 100, "the load ran throughout: {} writes acknowledged", acked.len());
    let st = restore_status(&coordinator).await?;
    assert_eq!(st["phase"], "done", "{st:#}");
    assert_eq!(st["members"][0]["step"], "released", "{st:#}");
    // m3 serves again, with every acknowledged write.
    let on_m3 =
        poll_until("m3 to hold every acknowledged write", Duration::from_secs(30), Duration::from_millis(500), || {
            let url = etcd.member(2).client_url().to_string();
            let n = acked.len();
            async move {
                let got = crate::fixtures::etcd::read_prefix(&[url], "/load/").await?;
                Ok((got.len() >= n).then_some(got))
            }
        })
        .await?;
    for key in &acked {
        assert!(on_m3.contains_key(key), "{key} was acknowledged but m3 does not have it");
    }
    let kept = std::fs::read_dir(etcd.member(2).data_dir())?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(".ferry-old-"));
    assert!(kept, "m3's old data is kept aside");
    let mut c = crate::fixtures::etcd::connect(&[etcd.member(0).client_url().to_string()]).await?;
    let members = c.member_list().await?;
    assert_eq!(members.members().len(), 3);
    assert!(members.members().iter().all(|m| !m.is_learner()), "every member votes");

    // m2 gone: replacing m3 now would leave one member of three, no quorum. Refused, once m2's agent said so.
    etcd.kill_member(1);
    poll_until("m2's agent to report its etcd down", Duration::from_secs(40), Duration::from_millis(500), || {
        let ctl = &ctl;
        async move {
            let a = ctl.get_json("agents", Some(&format!("{CLUSTER}/m2"))).await?;
            Ok(a["spec"]["etcderror"].as_str().is_some_and(|e| !e.is_empty()).then_some(()))
        }
    })
    .await?;
    let out = ctl.run(&["member", "replace", CLUSTER, "m3", "--yes"]).await?;
    assert!(out.stderr.contains("would lose quorum"), "{}", out.stderr);
    assert!(!etcd.gate(2).command()?.hold, "m3 was not touched");
    Ok(())
}

/// A new cluster boots from an old cluster's backup: its template says `features.restoreFrom`, its gates
/// start held (`--start-held`, etcd never starts on its own), and once its three agents are connected the
/// coordinator restores it. A backup of another cluster is refused for a cluster without `restoreFrom`.
#[tokio::test]
async fn a_new_cluster_boots_from_another_clusters_backup_through_its_template() -> anyhow::Result<()> {
    let old = EtcdCluster::start_gated(3).await?;
    old.put_keys(300).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _old_agents = start_gated_agents(&coordinator, &old).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let at_backup = keyspace(&old).await?;
    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT);

    let new = EtcdCluster::start_gated_held(3).await?;
    let template = format!(
        "kind: Cluster\nname: fresh\nfeatures:\n  restoreFrom:\n    cluster: {CLUSTER}\n    backup: {id}\n    members: 3\n"
    );
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &template)?;
    ctl.run(&["cluster", "template", "-f", &file.path().display().to_string(), "sync"]).await?.ok()?;
    // Connected, not serving: their gates hold etcd until the restore.
    let _agents = start_gated_agents_of(&coordinator, &new, "fresh", &agent_path()).await?;
    let st = poll_until("the new cluster restored", RESTORE_TIMEOUT, Duration::from_millis(500), || {
        let ctl = &ctl;
        async move {
            let list = ctl.list_json("etcdrestorestatus", None).await?;
            let st = list.into_iter().find(|r| r["metadata"]["id"] == "fresh").map(|r| r["spec"].clone());
            Ok(st.filter(|s| matches!(s["phase"].as_str(), Some("done" | "failed"))))
        }
    })
    .await?;
    assert_eq!(st["phase"], "done", "{st:#}");
    assert_eq!(st["plan"]["backupcluster"], CLUSTER);
    assert_eq!(keyspace(&new).await?, at_backup, "the new cluster serves the old one's backup");
    let (new_id, _) = cluster_id_and_revision(&new).await?;
    let (old_id, _) = cluster_id_and_revision(&old).await?;
    assert_ne!(new_id, old_id, "two clusters, two ids");

    // The old cluster has no restoreFrom: another cluster's backup is refused for it.
    let out = ctl
        .apply_yaml(&format!(
            "metadata:\n  namespace: default\n  type: EtcdRestores.ferry.dev\n  id: {CLUSTER}\nspec:\n  backup: latest\n  fromcluster: fresh\n  confirm: {CLUSTER}\n"
        ))
        .await?;
    assert!(out.stderr.contains("features.restoreFrom"), "{}", out.stderr);
    Ok(())
}

/// A restore gives the cluster a new history: the change log goes on as a new lineage from the restored
/// cluster's revision, and the old lineage (with the changes the restore discarded) stays listed.
#[tokio::test]
async fn a_restore_starts_a_new_lineage_of_the_change_log_and_keeps_the_old_one() -> anyhow::Result<()> {
    use crate::changelog::{changes, enable, pitr, wait_covered, wait_started};
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(50).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = start_gated_agents(&coordinator, &etcd).await?;
    enable(&coordinator, CLUSTER).await?;
    wait_started(&coordinator, CLUSTER).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let mut c = etcd.client().await?;
    for i in 0..10 {
        c.put(format!("/after-backup/{i}"), "lost", None).await?;
    }
    let (_, before) = cluster_id_and_revision(&etcd).await?;
    wait_covered(&coordinator, CLUSTER, before).await?;
    assert_eq!(pitr(&coordinator, CLUSTER).await?["lineage"], 0);

    let ctl = coordinator.ctl().with_timeout(RESTORE_TIMEOUT + Duration::from_secs(30));
    let out = ctl.run(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes", "--wait"]).await?;
    assert!(out.success(), "restore failed: {}\n{}", out.stdout, out.stderr);
    let mut c = etcd.client().await?;
    c.put("/after-restore/x", "kept", None).await?;
    let (_, after) = cluster_id_and_revision(&etcd).await?;
    let status =
        poll_until("the log on a new lineage", Duration::from_secs(90), Duration::from_millis(500), || async {
            let p = pitr(&coordinator, CLUSTER).await?;
            let on = p["lineage"] == 1 && p["coveredrevision"].as_i64().unwrap_or(0) >= after;
            Ok(on.then_some(p))
        })
        .await
        .with_context(|| crate::fixtures::logs::log_tail(coordinator.log_path(), 60))?;
    assert!(
        status["startrevision"].as_i64().unwrap_or(0) > before,
        "the new branch starts after the restore: {status}"
    );
    assert_eq!(status["gaps"], serde_json::json!([]), "a restore is a new lineage, not a gap: {status}");
    let rows = changes(&coordinator, CLUSTER, &[]).await?;
    let lost = rows.iter().filter(|r| r["key"].as_str().is_some_and(|k| k.starts_with("/after-backup/"))).count();
    assert_eq!(lost, 10, "the old lineage keeps what the restore discarded");
    assert!(rows.iter().any(|r| r["key"] == "/after-restore/x"), "the new lineage has the new write");
    Ok(())
}

/// A live restore to a point (issue 31): `ferryctl restore --to-time T --yes --wait` on three gated members
/// resolves T to the last revision before it (N), rebuilds the state at N on the coordinator, stores it as a derived backup (listed, naming its base
/// and revisions) and restores it through the orchestrated restore: the later writes and deletes are undone,
/// everything up to N is back, the revision is above any the cluster was seen at.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_restore_to_a_point_undoes_later_writes_and_deletes_and_keeps_earlier_ones() -> anyhow::Result<()> {
    use crate::changelog::{enable, revision, wait_covered, wait_started};
    let s3 = crate::fixtures::S3Server::start().await?;
    let etcd = EtcdCluster::start_gated(3).await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let _agents = start_gated_agents(&coordinator, &etcd).await?;
    enable(&coordinator, CLUSTER).await?;
    wait_started(&coordinator, CLUSTER).await?;
    let mut c = etcd.client().await?;
    for i in 0..10 {
        c.put(format!("/registry/pods/default/a{i}"), format!("v{i}"), None).await?;
    }
    let (base, _) = backup(&coordinator, CLUSTER).await?;
    // After the full backup, kept by the restore: in the log only.
    c.put("/registry/pods/default/new1", "n1", None).await?;
    for i in 0..3 {
        c.put(format!("/registry/pods/default/a{i}"), format!("w{i}"), None).await?;
    }
    c.delete("/registry/pods/default/a9", None).await?;
    let good = revision(&etcd).await?;
    let at_good = keyspace(&etcd).await?;
    // The point is given as a time between the good and the bad changes (the coordinator's clock).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let point = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The bad change found late: undone by the restore.
    c.delete("/registry/pods/default/", Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    c.put("/registry/secrets/default/planted", "bad", None).await?;
    let (_, highest) = cluster_id_and_revision(&etcd).await?;
    wait_covered(&coordinator, CLUSTER, highest).await?;
    // Let the agents report the newest revision.
    tokio::time::sleep(Duration::from_secs(11)).await;

    let args = ["restore", CLUSTER, "--to-time", &point, "--yes", "--wait", "--timeout", "5m"];
    let out = restore_ok(&coordinator, &args).await?;
    assert!(out.stdout.contains("derived backup"), "{}", out.stdout);
    assert_eq!(keyspace(&etcd).await?, at_good, "the key space is the one at revision {good}");
    let (_, revision_now) = cluster_id_and_revision(&etcd).await?;
    assert!(revision_now > highest, "revision {revision_now} must be above the {highest} the cluster was seen at");
    let derived = coordinator
        .backups(CLUSTER)
        .await?
        .into_iter()
        .find(|b| !b["spec"]["derivedfrom"].is_null())
        .context("the derived backup is listed")?;
    assert_eq!(derived["spec"]["derivedfrom"]["backup"], base.as_str(), "{derived}");
    assert_eq!(derived["spec"]["derivedfrom"]["revision"], good, "{derived}");
    assert_eq!(derived["spec"]["revision"], good, "{derived}");
    let st = restore_status(&coordinator).await?;
    assert_eq!(st["phase"], "done", "{st:#}");
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}
