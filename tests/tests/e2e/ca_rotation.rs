//! Rotating the coordinator's CA without a backup pause (issue 27, docs/SECURITY.md): `ferryctl ca rotate
//! start` makes a new CA trusted beside the old one; every connected agent renews onto it at once and scheduled
//! backups go on; `finish` is refused while a member is still on the old CA, then retires the old CA: its
//! certificates (an old admin ferryconfig, a stolen copy of a node's credentials) are refused, and a restarted
//! coordinator keeps the new CA and finds the backups taken before the rotation.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::fixtures::ferry::{CoordinatorOptions, Ferryctl};
use crate::fixtures::hostile::HostileAgent;
use crate::fixtures::{assert_daemon_logs_clean, poll_until, unix_now, Agent, Coordinator, EtcdCluster, Stop};

/// Copies a credentials dir (as an attacker copying a node's files would).
fn steal(creds: &std::path::Path, to: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(to)?;
    for f in ["ca.crt", "agent.crt", "agent.key"] {
        std::fs::copy(creds.join(f), to.join(f)).with_context(|| format!("copy {f}"))?;
    }
    Ok(to.to_path_buf())
}

async fn ca_status(ctl: &Ferryctl) -> anyhow::Result<Value> {
    ctl.run(&["ca", "status", "-o", "json"]).await?.ok()?.json()
}

#[tokio::test]
async fn a_ca_rotation_moves_every_agent_onto_the_new_ca_without_a_backup_pause() -> anyhow::Result<()> {
    const MEMBERS: [&str; 3] = ["m1", "m2", "m3"];
    // Scheduled backups every 10 s; none may be further apart than this while the CA turns over.
    const MAX_GAP_S: i64 = 40;
    let etcd = EtcdCluster::start(3).await?;
    let mut options = CoordinatorOptions::default();
    options.extra_args.extend(["--min-backup-interval".to_owned(), "10s".to_owned()]);
    let mut coordinator = Coordinator::start(options).await?;
    let ctl = coordinator.ctl();
    let mut creds = Vec::new();
    for member in MEMBERS {
        creds.push(coordinator.issue_agent_credentials("prod", member).await?);
    }
    // m3 is away while the rotation starts: it comes back still holding the old CA's certificate.
    let mut agents = Vec::new();
    for (i, c) in creds.iter().enumerate().take(2) {
        agents.push(Agent::start(&coordinator, c, etcd.member(i).client_url())?);
    }
    coordinator.wait_agents_connected("prod", &MEMBERS[..2], Duration::from_secs(30)).await?;
    let cluster = "metadata:\n  namespace: default\n  type: Clusters.ferry.dev\n  id: prod\n  labels:\n    \
                   ferry.dev/cluster: prod\nspec:\n  backupconfiguration:\n    interval:\n      seconds: 10\n      \
                   nanos: 0\n";
    ctl.apply_yaml(cluster).await?.ok()?;
    coordinator.wait_backup_status("prod", Duration::from_secs(60)).await?;
    let first_backup = coordinator.backups("prod").await?.last().cloned().context("a backup before the rotation")?;
    // What an operator (and an attacker) held before the rotation.
    let old_admin = coordinator.dir().join("old-admin.ferryconfig");
    std::fs::copy(coordinator.ferryconfig_path(), &old_admin)?;
    let stolen = steal(&creds[1], &coordinator.dir().join("stolen-m2"))?;
    let before = ca_status(&ctl).await?;
    anyhow::ensure!(before["next"].is_null(), "no rotation yet: {before}");

    // Start: a new CA signs from now on; both are trusted.
    let out = ctl.run(&["ca", "rotate", "start"]).await?.ok()?;
    anyhow::ensure!(out.stdout.contains("rotation started"), "{}", out.stdout);
    let again = ctl.run(&["ca", "rotate", "start"]).await?;
    anyhow::ensure!(!again.success() && again.stderr.contains("already under way"), "{}", again.stderr);
    let rotating = ca_status(&ctl).await?;
    let new_serial = rotating["next"]["serial"].as_str().context("next CA")?.to_string();
    anyhow::ensure!(rotating["current"]["serial"] == before["current"]["serial"], "{rotating}");

    // Both connected agents renew onto the new CA at once; m3 has not been seen since.
    poll_until("m1 and m2 on the new CA", Duration::from_secs(60), Duration::from_secs(1), || async {
        let st = ca_status(&ctl).await?;
        Ok((st["membersonoldca"] == serde_json::json!(["prod/m3"])).then_some(()))
    })
    .await?;
    // The old admin ferryconfig still works during the overlap.
    Ferryctl::new(&old_admin).run(&["get", "agents"]).await?.ok()?;
    let refused = ctl.run(&["ca", "rotate", "finish"]).await?;
    anyhow::ensure!(
        !refused.success() && refused.stderr.contains("prod/m3") && refused.stderr.contains("--force"),
        "finish must be refused while m3 is on the old CA: {}",
        refused.stderr
    );

    // m3 comes back with its old certificate (still trusted), renews, and nobody is left on the old CA.
    agents.push(Agent::start(&coordinator, &creds[2], etcd.member(2).client_url())?);
    poll_until("every member on the new CA", Duration::from_secs(60), Duration::from_secs(1), || async {
        let st = ca_status(&ctl).await?;
        Ok(st["membersonoldca"].as_array().is_some_and(Vec::is_empty).then_some(()))
    })
    .await?;
    for c in &creds {
        let ca = std::fs::read_to_string(c.join("current").join("ca.crt"))?;
        anyhow::ensure!(ca.matches("BEGIN CERTIFICATE").count() == 2, "the agent trusts both CAs: {}", c.display());
    }
    let out = ctl.run(&["ca", "rotate", "finish"]).await?.ok()?;
    anyhow::ensure!(out.stdout.contains("rotation finished"), "{}", out.stdout);
    let after = ca_status(&ctl).await?;
    anyhow::ensure!(after["current"]["serial"] == new_serial.as_str() && after["next"].is_null(), "{after}");

    // The old CA's certificates are refused: the old admin ferryconfig and the stolen copy of m2's files.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = Ferryctl::new(&old_admin).run(&["get", "agents"]).await?;
    anyhow::ensure!(!old.success(), "an admin certificate of the retired CA still works: {}", old.stdout);
    // The attacker trusts the new CA too (it is no secret): the coordinator is what refuses the certificate.
    std::fs::copy(creds[0].join("current").join("ca.crt"), stolen.join("ca.crt"))?;
    anyhow::ensure!(
        HostileAgent::connect(&coordinator, &stolen).await.is_err(),
        "a stolen old-CA certificate connects"
    );
    // Backups go on through the new CA, and after a restart (which keeps the new CA and the store prefix).
    ctl.run(&["backup", "now", "prod", "--wait"]).await?.ok()?;
    coordinator.restart(Stop::Term).await?;
    anyhow::ensure!(ca_status(&ctl).await?["current"]["serial"] == new_serial.as_str(), "the new CA after a restart");
    coordinator.wait_agents_connected("prod", &MEMBERS, Duration::from_secs(30)).await?;
    ctl.run(&["backup", "now", "prod", "--wait"]).await?.ok()?;
    let id = first_backup["metadata"]["id"].as_str().context("backup id")?;
    coordinator.download_backup("prod", id, &coordinator.dir().join("first.db"), true).await?;

    // Scheduled backups never paused: at most MAX_GAP_S between consecutive commits.
    let mut times: Vec<i64> =
        coordinator.backups("prod").await?.iter().filter_map(|b| b["spec"]["createdat"]["seconds"].as_i64()).collect();
    times.sort_unstable();
    times.push(unix_now());
    let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("{} backups through the rotation; gaps {gaps:?}", times.len() - 1);
    anyhow::ensure!(gaps.iter().all(|g| *g <= MAX_GAP_S), "backups paused: {gaps:?}");
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

/// Replicas share the CAs in the state etcd: a rotation started through the leader survives its SIGKILL, the
/// next leader finishes it, every surviving replica serves the new CA (ferryctl and backups through each), and
/// the killed replica restarted holds the new CA and rewrites its own admin.ferryconfig.
#[tokio::test]
async fn replicas_share_a_ca_rotation_across_a_failover() -> anyhow::Result<()> {
    use crate::ha::{index_of, start_replicas, wait_new_leader, TAKEOVER};
    let s3 = crate::fixtures::S3Server::start().await?;
    let state = EtcdCluster::start(3).await?;
    let etcd = EtcdCluster::start(1).await?;
    let (mut replicas, addresses) = start_replicas(&s3, &state, &[]).await?;
    let first = wait_new_leader(&state, None, TAKEOVER).await?;
    let lead = index_of(&addresses, &first)?;
    let agents = replicas[lead].start_agents("ha", &etcd).await?;
    let out = replicas[lead].ctl().run(&["ca", "rotate", "start"]).await?.ok()?;
    anyhow::ensure!(out.stdout.contains("rotation started"), "{}", out.stdout);
    let new_serial = ca_status(&replicas[lead].ctl()).await?["next"]["serial"].as_str().context("next")?.to_string();
    poll_until("the agent on the new CA", Duration::from_secs(60), Duration::from_secs(1), || async {
        let st = ca_status(&replicas[lead].ctl()).await?;
        Ok(st["membersonoldca"].as_array().is_some_and(Vec::is_empty).then_some(()))
    })
    .await?;

    replicas[lead].kill();
    let second = wait_new_leader(&state, Some(&first), TAKEOVER).await?;
    let next = index_of(&addresses, &second)?;
    replicas[next].wait_agents_connected("ha", &["m1"], Duration::from_secs(30)).await?;
    let out = replicas[next].ctl().run(&["ca", "rotate", "finish"]).await?.ok()?;
    anyhow::ensure!(out.stdout.contains("rotation finished"), "{}", out.stdout);
    // The other survivor reads the step within its 5 s poll; each one's ferryctl works and backs up.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for i in (0..3).filter(|i| *i != lead) {
        let st = ca_status(&replicas[i].ctl()).await?;
        anyhow::ensure!(st["current"]["serial"] == new_serial.as_str() && st["next"].is_null(), "replica {i}: {st}");
        replicas[i].ctl().run(&["backup", "now", "ha", "--wait"]).await?.ok()?;
        let cfg = std::fs::read_to_string(replicas[i].ferryconfig_path())?;
        anyhow::ensure!(cfg.matches("BEGIN CERTIFICATE").count() == 2, "replica {i}: the new CA and a certificate");
    }
    replicas[lead].restart(Stop::Kill).await?;
    let st = ca_status(&replicas[lead].ctl()).await?;
    anyhow::ensure!(st["current"]["serial"] == new_serial.as_str(), "the restarted replica: {st}");
    replicas[lead].ctl().run(&["backup", "now", "ha", "--wait"]).await?.ok()?;
    drop(agents);
    Ok(())
}
