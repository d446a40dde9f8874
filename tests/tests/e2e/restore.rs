//! Restores end to end with `ferry-agent restore`: a whole 3-member cluster brought back from a backup
//! (the runbook of `docs/RESTORE.md`), backups that fail a check refused without touching the data dir, a
//! non-empty data dir kept aside only with `--force`, agents limited to their own cluster's backups, and
//! `ferryctl backup verify` reporting what the backup holds.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::GetOptions;
use serde_json::Value;

use crate::fixtures::etcd::{read_prefix, EtcdMember};
use crate::fixtures::ferry::agent_restore;
use crate::fixtures::ports::free_port;
use crate::fixtures::{
    assert_no_unexpected_errors, assert_same_kvs, expected_test_kvs, test_dir, unix_now, Coordinator,
    CoordinatorOptions, CtlOutput, EtcdCluster, STARTUP_TIMEOUT, STATUS_OK, TEST_PREFIX,
};

const CLUSTER: &str = "prod";
const BACKUP_TIMEOUT: Duration = Duration::from_secs(45);
/// The token of single-member restores (a whole-cluster restore makes its own).
const RESTORED_TOKEN: &str = "ferry-e2e-restored";
/// The member name of single-member restores.
const RESTORED_MEMBER: &str = "restored";
/// Deadline for one request to a restored etcd.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes a manual backup of `cluster`, waits until it succeeded and returns the new backup's id and spec.
pub(super) async fn backup(coordinator: &Coordinator, cluster: &str) -> anyhow::Result<(String, Value)> {
    let before = coordinator.backups(cluster).await?.len();
    let previous = coordinator.backup_status(cluster).await?;
    coordinator.manual_backup(cluster).await?;
    let status = if previous["lastbackupattempt"].is_null() {
        coordinator.wait_backup_status(cluster, BACKUP_TIMEOUT).await?
    } else {
        coordinator.wait_next_backup_status(cluster, &previous, BACKUP_TIMEOUT).await?
    };
    anyhow::ensure!(status["status"] == STATUS_OK, "the backup of {cluster} failed: {status:#}");
    let backups = coordinator.backups(cluster).await?;
    anyhow::ensure!(backups.len() == before + 1, "one more backup of {cluster} expected: {backups:#?}");
    let id = backups[0]["metadata"]["id"].as_str().context("backup metadata.id")?.to_owned();
    Ok((id, backups[0]["spec"].clone()))
}

/// `--coordinator ADDR --credentials DIR`: an agent restoring its own cluster's backup.
pub(super) fn as_agent(coordinator: &Coordinator, credentials: &Path) -> Vec<String> {
    vec!["--coordinator".into(), coordinator.addr(), "--credentials".into(), credentials.display().to_string()]
}

/// `--ferryconfig PATH --from-cluster CLUSTER`: a ferryconfig (the admin's, normally) restoring `cluster`'s.
fn with_ferryconfig(ferryconfig: &Path, cluster: &str) -> Vec<String> {
    vec!["--ferryconfig".into(), ferryconfig.display().to_string(), "--from-cluster".into(), cluster.into()]
}

/// The flags that say what to restore where, for a new one-member cluster whose member peers at `peer_url`.
pub(super) fn one_member(backup: &str, data_dir: &Path, peer_url: &str) -> Vec<String> {
    [
        "--backup",
        backup,
        "--data-dir",
        &data_dir.display().to_string(),
        "--name",
        RESTORED_MEMBER,
        "--initial-cluster",
        &format!("{RESTORED_MEMBER}={peer_url}"),
        "--initial-cluster-token",
        RESTORED_TOKEN,
        "--initial-advertise-peer-urls",
        peer_url,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A loopback peer URL on a free port, for a member that will serve a restored data dir.
pub(super) fn peer_url() -> (u16, String) {
    let port = free_port();
    (port, format!("http://127.0.0.1:{port}"))
}

/// Asserts a restore failed and said why with one of `keywords`.
#[track_caller]
pub(super) fn assert_restore_refused(out: &CtlOutput, keywords: &[&str]) {
    assert!(!out.success(), "`{}` should have failed; stderr: {}", out.command, out.stderr);
    let error = out.stderr.lines().filter(|l| l.starts_with("error:")).collect::<Vec<_>>().join("\n");
    assert!(!error.is_empty(), "`{}`: no `error:` line on stderr: {}", out.command, out.stderr);
    assert!(
        keywords.iter().any(|k| error.contains(k)),
        "`{}`: the error should name one of {keywords:?}: {error}",
        out.command
    );
}

/// Every entry under `dir`, by relative path: a file's contents, `None` for a directory.
fn tree(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, Option<Vec<u8>>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            let relative = path.strip_prefix(root)?.to_owned();
            if path.is_dir() {
                out.insert(relative, None);
                walk(root, &path, out)?;
            } else {
                out.insert(relative, Some(std::fs::read(&path)?));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Makes `dir` look like a member's data dir that holds data, plus a file of the operator's.
fn fill_with_old_data(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("member/snap"))?;
    std::fs::create_dir_all(dir.join("member/wal"))?;
    std::fs::write(dir.join("member/snap/db"), b"the old member's database")?;
    std::fs::write(dir.join("member/wal/0000000000000000-0000000000000000.wal"), b"the old member's wal")?;
    std::fs::write(dir.join("notes.txt"), b"kept by the operator")?;
    Ok(())
}

/// Serves a restored one-member data dir (restored with [`one_member`] and `peer_port`) with etcd and
/// returns its keys under [`TEST_PREFIX`].
pub(super) async fn serve_and_read(
    data_dir: &Path,
    peer_port: u16,
    log: &Path,
) -> anyhow::Result<HashMap<String, String>> {
    let initial_cluster = format!("{RESTORED_MEMBER}=http://127.0.0.1:{peer_port}");
    let mut member =
        EtcdMember::spawn(RESTORED_MEMBER, free_port(), peer_port, data_dir, &initial_cluster, RESTORED_TOKEN, log)?;
    member.wait_healthy(STARTUP_TIMEOUT).await.context("start etcd on the restored data dir")?;
    let kvs = read_prefix(&[member.client_url().to_owned()], TEST_PREFIX).await;
    member.stop().await;
    kvs
}

/// A ferryconfig holding an *agent's* certificate rather than the admin's: `ferry-agent restore --ferryconfig`
/// must not turn it into an admin.
fn agent_ferryconfig(coordinator: &Coordinator, credentials: &Path, out: &Path) -> anyhow::Result<()> {
    let read = |name: &str| std::fs::read_to_string(credentials.join(name)).with_context(|| format!("read {name}"));
    // JSON is YAML; the file holds a private key, and is refused unless only its owner can read it.
    let config = serde_json::json!({
        "coordinator": coordinator.addr(),
        "ca": read("ca.crt")?,
        "cert": read("agent.crt")?,
        "key": read("agent.key")?,
    });
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(out)?;
    std::io::Write::write_all(&mut file, serde_json::to_string_pretty(&config)?.as_bytes())?;
    Ok(())
}

/// The disaster, then the recovery of `docs/RESTORE.md`: every agent stopped, every member stopped and its
/// data dir wiped, then `ferry-agent restore` of backup `id` on every member, each with its own name and peer
/// URL, into a new cluster named by `token`. Returns each member's restore output, in member order; the
/// members are left stopped.
async fn disaster_then_restore_every_member(
    coordinator: &Coordinator,
    etcd: &mut EtcdCluster,
    agents: &mut [crate::fixtures::Agent],
    id: &str,
    token: &str,
) -> anyhow::Result<Vec<CtlOutput>> {
    for agent in agents.iter_mut() {
        agent.stop().await;
    }
    etcd.stop_all().await?;
    for member in etcd.members() {
        std::fs::remove_dir_all(member.data_dir())?;
    }
    let mut outputs = Vec::new();
    for member in etcd.members() {
        let credentials = coordinator.issue_agent_credentials(CLUSTER, member.name()).await?;
        let mut args = as_agent(coordinator, &credentials);
        args.extend(
            [
                "--backup",
                id,
                "--data-dir",
                &member.data_dir().display().to_string(),
                "--name",
                member.name(),
                "--initial-cluster",
                etcd.initial_cluster(),
                "--initial-cluster-token",
                token,
                "--initial-advertise-peer-urls",
                member.peer_url(),
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        let out = agent_restore(&args).await?.ok()?;
        anyhow::ensure!(member.data_dir().join("member").is_dir(), "{} restored no member/ dir", member.name());
        outputs.push(out);
    }
    Ok(outputs)
}

#[tokio::test]
async fn three_member_cluster_comes_back_from_ferry_restore() -> anyhow::Result<()> {
    const KEYS: usize = 3000;
    let mut etcd = EtcdCluster::start(3).await?;
    let written_at = etcd.put_keys(KEYS).await?;
    let keyspace_before = etcd.read_prefix("").await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let (id, spec) = backup(&coordinator, CLUSTER).await?;
    let backup_revision = spec["revision"].as_i64().context("backup spec.revision")?;
    assert!(backup_revision >= written_at, "backup revision {backup_revision} < {written_at} of the writes");
    let old_cluster_id = spec["etcdclusterid"].as_str().context("backup spec.etcdclusterid")?.to_owned();

    // The disaster: every member down and its data gone. A restore needs only the coordinator. Every member
    // restores the same backup id, with its own name and peer URL, into a new cluster.
    let token = format!("ferry-e2e-restored-{}", std::process::id());
    let outputs = disaster_then_restore_every_member(&coordinator, &mut etcd, &mut agents, &id, &token).await?;
    etcd.start_stopped_members().await?;

    assert_same_kvs(&expected_test_kvs(KEYS), &etcd.read_prefix(TEST_PREFIX).await?, "keys after the restore");
    assert_same_kvs(&keyspace_before, &etcd.read_prefix("").await?, "whole keyspace: before the disaster vs after");
    let mut client = etcd.client().await?;
    let count = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.get("", Some(GetOptions::new().with_all_keys().with_count_only())),
    )
    .await
    .context("count keys: timed out")?
    .map_err(|e| anyhow::anyhow!("count keys: {e:?}"))?;
    let revision = count.header().context("response header")?.revision();
    assert!(revision >= backup_revision, "revision {revision} went back behind the backup's {backup_revision}");

    // A new cluster (new token, new id) of all three members, with quorum: a write goes through.
    let members = tokio::time::timeout(REQUEST_TIMEOUT, client.member_list())
        .await
        .context("member list: timed out")?
        .map_err(|e| anyhow::anyhow!("member list: {e:?}"))?;
    let mut names: Vec<&str> = members.members().iter().map(|m| m.name()).collect();
    names.sort_unstable();
    assert_eq!(names, ["m1", "m2", "m3"], "the restored cluster's members");
    let cluster_id = format!("{:x}", members.header().context("response header")?.cluster_id());
    assert_ne!(cluster_id, old_cluster_id, "a restore with a new token makes a new cluster");
    let put = tokio::time::timeout(REQUEST_TIMEOUT, client.put("/ferry-e2e/after-restore", "written", None))
        .await
        .context("write after the restore: timed out")?
        .map_err(|e| anyhow::anyhow!("write after the restore: {e:?}"))?;
    let put_revision = put.header().context("response header")?.revision();
    assert!(put_revision > backup_revision, "a write after the restore got revision {put_revision}");

    for out in &outputs {
        assert!(!out.stderr.contains(" ERROR "), "`{}` logged an error: {}", out.command, out.stderr);
        // A small database on a machine with memory to spare: the scratch copy never touched the disk.
        assert!(
            out.stderr.contains("waits in memory"),
            "`{}` kept its scratch copy elsewhere: {}",
            out.command,
            out.stderr
        );
    }
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn corrupted_and_truncated_backups_are_refused_and_leave_the_data_dir_alone() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(500).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let credentials = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;

    let object = coordinator.store_dir().join(CLUSTER).join(format!("{id}.snapshot.zst"));
    let intact = std::fs::read(&object).with_context(|| format!("read {}", object.display()))?;
    let mut flipped = intact.clone();
    flipped[intact.len() / 2] ^= 0xff;
    let truncated = intact[..intact.len() / 2].to_vec();

    let dir = test_dir("restore-refused")?;
    let existing = dir.path().join("existing.etcd");
    fill_with_old_data(&existing)?;
    let existing_before = tree(&existing)?;
    let (_, peer) = peer_url();
    let damages = [
        ("a flipped byte", flipped, ["sha256", "corrupted", "decompress"]),
        ("truncated", truncated, ["truncated", "decompress", "corrupted"]),
    ];
    for (i, (what, bytes, keywords)) in damages.iter().enumerate() {
        std::fs::write(&object, bytes)?;

        // Into a data dir that does not exist yet: refused, and the dir is not even created.
        let fresh = dir.path().join(format!("fresh-{i}.etcd"));
        let out =
            agent_restore(&[as_agent(&coordinator, &credentials), one_member(&id, &fresh, &peer)].concat()).await?;
        assert_restore_refused(&out, keywords);
        assert!(!fresh.exists(), "a refused restore ({what}) created {}", fresh.display());

        // Over a member's data with --force: refused before anything is moved, with the scratch copy in
        // memory (the default here) or on disk inside the data dir, where it is removed again.
        let mut args = [as_agent(&coordinator, &credentials), one_member(&id, &existing, &peer)].concat();
        args.push("--force".into());
        args.extend(["--scratch".into(), ["memory", "disk"][i].into()]);
        let out = agent_restore(&args).await?;
        assert_restore_refused(&out, keywords);
        assert!(tree(&existing)? == existing_before, "a refused restore ({what}) changed {}", existing.display());

        // `backup verify` refuses it too.
        let out = coordinator.ctl().run(&["backup", "verify", CLUSTER, &id]).await?;
        assert_restore_refused(&out, keywords);
    }

    // The intact object restores over the same dir: the refusals were about the bytes. Its scratch copy on
    // disk is gone afterwards, and so is one that a killed restore left behind.
    std::fs::write(&object, &intact)?;
    std::fs::write(existing.join(".ferry-restore-1795000000.db"), b"left by a killed restore")?;
    let mut args = [as_agent(&coordinator, &credentials), one_member(&id, &existing, &peer)].concat();
    args.extend(["--force", "--scratch", "disk"].map(String::from));
    let out = agent_restore(&args).await?.ok()?;
    assert!(out.stderr.contains("waits on disk"), "--scratch disk said nothing of it: {}", out.stderr);
    assert!(existing.join("member/snap/db").is_file(), "the restore put a member in place");
    let scratch: Vec<_> = std::fs::read_dir(&existing)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-restore-"))
        .map(|e| e.path())
        .collect();
    assert!(scratch.is_empty(), "the restore left its scratch copy: {scratch:?}");
    assert_ne!(
        std::fs::read(existing.join("member/snap/db"))?,
        b"the old member's database",
        "the restored db replaced the old one"
    );
    Ok(())
}

#[tokio::test]
async fn non_empty_data_dir_is_refused_without_force_and_kept_aside_with_it() -> anyhow::Result<()> {
    const KEYS: usize = 200;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(KEYS).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    backup(&coordinator, CLUSTER).await?;
    let credentials = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;

    let dir = test_dir("restore-force")?;
    let data = dir.path().join("member.etcd");
    fill_with_old_data(&data)?;
    let before = tree(&data)?;
    let (peer_port, peer) = peer_url();
    let args = [as_agent(&coordinator, &credentials), one_member("latest", &data, &peer)].concat();

    let out = agent_restore(&args).await?;
    assert_restore_refused(&out, &["--force"]);
    assert!(tree(&data)? == before, "a refused restore changed {}", data.display());

    let started = unix_now();
    let out = agent_restore(&[args, vec!["--force".into()]].concat()).await?.ok()?;
    let finished = unix_now();
    assert!(!out.stderr.contains(" ERROR "), "the restore logged an error: {}", out.stderr);

    // The old contents moved, whole, into .ferry-old-<unix seconds>/; nothing else of Ferry's is left but the
    // marker of the finished restore.
    let mut entries: Vec<String> = std::fs::read_dir(&data)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    entries.sort();
    let [aside, marker, member] = entries.as_slice() else {
        anyhow::bail!(
            "the data dir should hold the restored member/, the old data set aside and the marker: {entries:?}"
        );
    };
    assert_eq!(marker, ".ferry-restored", "{entries:?}");
    assert_eq!(member, "member", "{entries:?}");
    let stamp: i64 = aside
        .strip_prefix(".ferry-old-")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the old data should be in .ferry-old-<unix seconds>/: {entries:?}"))?;
    assert!((started..=finished).contains(&stamp), "{aside}: not stamped with the restore's time");
    assert!(tree(&data.join(aside))? == before, "the old contents were not kept as they were");

    // The restored dir serves the backed-up keys.
    let restored = serve_and_read(&data, peer_port, &dir.path().join("etcd-restored.log")).await?;
    assert_same_kvs(&expected_test_kvs(KEYS), &restored, "keys served from the restored data dir");
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

/// `--force` never swaps the data dir of a running etcd, never moves aside a dir that is not an etcd data
/// dir, and the same restore run twice (a static pod re-created) restores once.
#[tokio::test]
async fn restore_refuses_a_live_members_dir_and_a_foreign_dir_and_runs_once() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    backup(&coordinator, CLUSTER).await?;
    let credentials = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;
    let (_, peer) = peer_url();

    // The live member's own data dir, with --force: refused, and etcd keeps serving its data.
    let live = etcd.member(0).data_dir().to_path_buf();
    let before = tree(&live.join("member/snap"))?.len();
    let mut args = [as_agent(&coordinator, &credentials), one_member("latest", &live, &peer)].concat();
    args.push("--force".into());
    assert_restore_refused(&agent_restore(&args).await?, &["in use by a running etcd"]);
    assert!(!live.join(".ferry-restored").exists() && tree(&live.join("member/snap"))?.len() == before);
    etcd.put_keys(101).await.context("the live member still writes after the refused restore")?;

    // Something that is not an etcd data dir (a typo'd path: /var/lib, a home dir): refused even with --force.
    let dir = test_dir("restore-guards")?;
    let foreign = dir.path().join("not-etcd");
    std::fs::create_dir_all(foreign.join("postgres"))?;
    std::fs::write(foreign.join("important.txt"), b"someone's data")?;
    let foreign_before = tree(&foreign)?;
    let mut args = [as_agent(&coordinator, &credentials), one_member("latest", &foreign, &peer)].concat();
    args.push("--force".into());
    assert_restore_refused(&agent_restore(&args).await?, &["neither empty nor an etcd data dir"]);
    assert!(tree(&foreign)? == foreign_before, "the refused restore changed {}", foreign.display());

    // A static pod's init container runs the same restore at every start: the second run does nothing.
    let data = dir.path().join("member.etcd");
    let mut args = [as_agent(&coordinator, &credentials), one_member("latest", &data, &peer)].concat();
    args.push("--force".into());
    agent_restore(&args).await?.ok()?;
    let restored = tree(&data)?;
    let again = agent_restore(&args).await?.ok()?;
    assert!(again.stdout.contains("already restored"), "the second run says so: {}", again.stdout);
    assert!(tree(&data)? == restored, "the second run changed the data dir");
    // A new cluster token is a new restore.
    let mut other = [as_agent(&coordinator, &credentials), one_member("latest", &data, &peer)].concat();
    let token = other.iter().position(|a| a == "--initial-cluster-token").context("token flag")? + 1;
    other[token] = "another-restore".into();
    other.push("--force".into());
    let out = agent_restore(&other).await?.ok()?;
    assert!(!out.stdout.contains("already restored"), "{}", out.stdout);
    Ok(())
}

#[tokio::test]
async fn agent_cannot_restore_another_clusters_backup() -> anyhow::Result<()> {
    const ALPHA_KEYS: usize = 100;
    const BETA_KEYS: usize = 300;
    let alpha = EtcdCluster::start(1).await?;
    alpha.put_keys(ALPHA_KEYS).await?;
    let beta = EtcdCluster::start(1).await?;
    beta.put_keys(BETA_KEYS).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _alpha_agents = coordinator.start_agents("alpha", &alpha).await?;
    let _beta_agents = coordinator.start_agents("beta", &beta).await?;
    let (alpha_id, _) = backup(&coordinator, "alpha").await?;
    let (beta_id, _) = backup(&coordinator, "beta").await?;
    let alpha_credentials = coordinator.issue_agent_credentials("alpha", "m1").await?;

    let dir = test_dir("restore-clusters")?;
    let refused = dir.path().join("refused.etcd");
    let (_, peer) = peer_url();

    // An agent asking for another cluster's backup is refused by the coordinator: that takes an admin.
    let mut args = as_agent(&coordinator, &alpha_credentials);
    args.extend(["--from-cluster".into(), "beta".into()]);
    args.extend(one_member("latest", &refused, &peer));
    assert_restore_refused(&agent_restore(&args).await?, &["admin credential"]);
    assert!(!refused.exists(), "a refused restore created {}", refused.display());

    // The same from a ferryconfig holding the agent's certificate: the certificate decides, not the file.
    let agent_config = dir.path().join("alpha-agent.ferryconfig");
    agent_ferryconfig(&coordinator, &alpha_credentials, &agent_config)?;
    let args = [with_ferryconfig(&agent_config, "beta"), one_member("latest", &refused, &peer)].concat();
    assert_restore_refused(&agent_restore(&args).await?, &["admin credential"]);
    assert!(!refused.exists(), "a refused restore created {}", refused.display());

    // By id, beta's backup is not among alpha's.
    let args = [as_agent(&coordinator, &alpha_credentials), one_member(&beta_id, &refused, &peer)].concat();
    assert_restore_refused(&agent_restore(&args).await?, &["not found"]);
    assert!(!refused.exists(), "a refused restore created {}", refused.display());

    // The admin must say which cluster's backup it restores.
    let admin = coordinator.ferryconfig_path();
    let args =
        [vec!["--ferryconfig".to_owned(), admin.display().to_string()], one_member("latest", &refused, &peer)].concat();
    assert_restore_refused(&agent_restore(&args).await?, &["--from-cluster"]);

    // The agent's own latest backup is alpha's.
    let alpha_data = dir.path().join("alpha.etcd");
    let (alpha_port, alpha_peer) = peer_url();
    let args = [as_agent(&coordinator, &alpha_credentials), one_member("latest", &alpha_data, &alpha_peer)].concat();
    let out = agent_restore(&args).await?.ok()?;
    assert!(out.stderr.contains(&alpha_id), "the agent restores its own cluster's latest, {alpha_id}: {}", out.stderr);
    let restored = serve_and_read(&alpha_data, alpha_port, &dir.path().join("etcd-alpha.log")).await?;
    assert_same_kvs(&expected_test_kvs(ALPHA_KEYS), &restored, "alpha's keys, restored by alpha's agent");

    // The admin seeds a new cluster from beta's backup.
    let beta_data = dir.path().join("seeded-from-beta.etcd");
    let (beta_port, beta_peer) = peer_url();
    let args = [with_ferryconfig(&admin, "beta"), one_member("latest", &beta_data, &beta_peer)].concat();
    let out = agent_restore(&args).await?.ok()?;
    assert!(out.stderr.contains(&beta_id), "the admin restores beta's latest, {beta_id}: {}", out.stderr);
    let restored = serve_and_read(&beta_data, beta_port, &dir.path().join("etcd-beta.log")).await?;
    assert_same_kvs(&expected_test_kvs(BETA_KEYS), &restored, "beta's keys, restored with the admin credential");

    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn backup_verify_reports_the_key_count_written() -> anyhow::Result<()> {
    const KEYS: usize = 1234;
    let etcd = EtcdCluster::start(1).await?;
    let written_at = etcd.put_keys(KEYS).await?;
    // etcd's own count of every key, whatever else lives in the keyspace.
    let mut client = etcd.client().await?;
    let count = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.get("", Some(GetOptions::new().with_all_keys().with_count_only())),
    )
    .await
    .context("count keys: timed out")?
    .map_err(|e| anyhow::anyhow!("count keys: {e:?}"))?
    .count();
    assert!(count >= KEYS as i64, "etcd counts {count} keys after {KEYS} were written");

    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let (_, spec) = backup(&coordinator, CLUSTER).await?;

    let out = coordinator
        .ctl()
        .with_timeout(Duration::from_secs(60))
        .run(&["backup", "verify", CLUSTER, "latest"])
        .await?
        .ok()?;
    let field = |name: &str| -> anyhow::Result<String> {
        let line = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no `{name}` line in: {}", out.stdout))?;
        Ok(line.trim().to_owned())
    };
    assert_eq!(field("keys:")?.parse::<i64>()?, count, "verify counts the keys etcd held: {}", out.stdout);
    let revision: i64 = field("revision:")?.parse()?;
    assert!(revision >= written_at, "verify reports revision {revision}, before the writes' {written_at}");
    assert_eq!(Some(revision), spec["revision"].as_i64(), "the snapshot's revision is the backup's");
    let db_size: u64 = field("db size:")?.split_whitespace().next().unwrap_or_default().parse()?;
    assert!(db_size > 0, "verify reports a db size: {}", out.stdout);
    assert_eq!(out.stdout.lines().rfind(|l| !l.trim().is_empty()), Some("OK"), "verify ends with OK: {}", out.stdout);

    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

/// The revision a restore printed: `restored revision: A -> B (...)` -> `(A, B)`.
fn restored_revision(out: &CtlOutput) -> anyhow::Result<(i64, i64)> {
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("restored revision: "))
        .with_context(|| format!("`{}` printed no `restored revision:` line: {}", out.command, out.stdout))?;
    let (from, rest) = line.split_once(" -> ").context("`A -> B`")?;
    let to = rest.split_whitespace().next().context("B")?;
    Ok((from.parse()?, to.parse()?))
}

/// The revision member `url` serves (its own header, not the leader's).
async fn member_revision(url: &str) -> anyhow::Result<i64> {
    let mut client = crate::fixtures::etcd::connect(&[url.to_owned()]).await?;
    let status = tokio::time::timeout(REQUEST_TIMEOUT, client.status())
        .await
        .context("status: timed out")?
        .map_err(|e| anyhow::anyhow!("status of {url}: {e:?}"))?;
    Ok(status.header().context("status header")?.revision())
}

/// The disaster Kubernetes must survive: after a restore, every member's revision is above the highest one
/// the live cluster reached, and a watch from just after the backup is told its revision is compacted (so a
/// kube-apiserver's watch cache relists instead of waiting for revisions that now mean other data).
#[tokio::test]
async fn restore_bumps_every_member_above_the_live_revision_and_marks_it_compacted() -> anyhow::Result<()> {
    const KEYS: usize = 500;
    const WRITES_AFTER: usize = 300;
    anyhow::ensure!(
        crate::fixtures::tools::etcd_can_bump_revision(),
        "this test needs etcd 3.5 (etcdutl): run it without FERRY_ETCD_DIR pointing at etcd 3.4"
    );
    let mut etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(KEYS).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let (id, spec) = backup(&coordinator, CLUSTER).await?;
    let backup_revision = spec["revision"].as_i64().context("backup spec.revision")?;

    // Life goes on after the backup: one revision per write, far past the backup's.
    let mut client = etcd.client().await?;
    let mut live_revision = 0;
    for i in 0..WRITES_AFTER {
        let put = client.put(format!("/registry/after-backup/{i:04}"), "lost in the disaster", None).await?;
        live_revision = put.header().context("put header")?.revision();
    }
    assert!(live_revision >= backup_revision + WRITES_AFTER as i64, "live {live_revision} vs backup {backup_revision}");
    // The agents report it (every 10 s): the coordinator now knows how far the cluster got.
    crate::fixtures::poll_until(
        "every agent to report the live revision",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let agents = coordinator.ctl().get_json("agents", None).await?;
            let revisions: Vec<i64> =
                agents.as_array().context("agents")?.iter().filter_map(|a| a["spec"]["revision"].as_i64()).collect();
            Ok((revisions.len() == 3 && revisions.iter().all(|r| *r >= live_revision)).then_some(()))
        },
    )
    .await?;

    // Every member restores with the defaults: no bump flag.
    let token = format!("ferry-e2e-bumped-{}", std::process::id());
    let outputs = disaster_then_restore_every_member(&coordinator, &mut etcd, &mut agents, &id, &token).await?;
    let mut restored = Vec::new();
    for (member, out) in etcd.members().iter().zip(&outputs) {
        let seen_at: i64 = out
            .stdout
            .split("the cluster was seen at revision ")
            .nth(1)
            .and_then(|rest| rest.trim_end().trim_end_matches(')').parse().ok())
            .with_context(|| format!("the restore says which revision the cluster was seen at: {}", out.stdout))?;
        assert!(seen_at >= live_revision, "{}: planned from revision {seen_at} < live {live_revision}", member.name());
        restored.push(restored_revision(out)?);
    }
    assert!(restored.windows(2).all(|w| w[0] == w[1]), "every member must get the same bump: {restored:?}");
    let (snapshot_revision, bumped_to) = restored[0];
    assert!(snapshot_revision >= backup_revision, "snapshot at {snapshot_revision}, backup said {backup_revision}");
    assert!(bumped_to > live_revision, "restored at {bumped_to}, not above the live cluster's {live_revision}");
    etcd.start_stopped_members().await?;

    // Every member serves a revision above anything the live cluster reached.
    for member in etcd.members() {
        let revision = member_revision(member.client_url()).await?;
        assert!(revision > live_revision, "{} serves revision {revision} <= live {live_revision}", member.name());
    }
    // The backup's keys are back, and nothing written after it.
    assert_same_kvs(&expected_test_kvs(KEYS), &etcd.read_prefix(TEST_PREFIX).await?, "keys after the restore");
    assert!(etcd.read_prefix("/registry/after-backup/").await?.is_empty(), "writes after the backup came back");

    // A watcher that had seen revisions past the backup is told to relist.
    let mut client = etcd.client().await?;
    let mut stream = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.watch(
            TEST_PREFIX,
            Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(backup_revision + 1)),
        ),
    )
    .await
    .context("watch: timed out")??;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, stream.message())
        .await
        .context("watch response: timed out")??
        .context("watch stream ended")?;
    let response = if response.created() && response.compact_revision() == 0 {
        // Some etcd versions confirm the watch first, then cancel it.
        tokio::time::timeout(REQUEST_TIMEOUT, stream.message())
            .await
            .context("watch cancel: timed out")??
            .context("watch stream ended")?
    } else {
        response
    };
    assert!(
        response.compact_revision() >= bumped_to,
        "the watch from {} should be cancelled as compacted at {bumped_to}: {response:?}",
        backup_revision + 1
    );
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

/// Where only etcd 3.4's tools are (no etcdutl), a restore refuses up front, naming the etcdutl it needs,
/// unless told `--no-bump-revision`; then it restores at the snapshot's own revision.
#[tokio::test]
async fn restore_without_etcdutl_refuses_unless_told_not_to_bump() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(200).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let (id, _) = backup(&coordinator, CLUSTER).await?;
    let credentials = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;

    // etcdctl alone, as on a host with etcd 3.4's client tools.
    let dir = test_dir("restore-34-tools")?;
    let tools = dir.path().join("bin");
    std::fs::create_dir_all(&tools)?;
    std::os::unix::fs::symlink(crate::fixtures::tools::etcd_tool("etcdctl")?, tools.join("etcdctl"))?;
    let path = std::env::join_paths([tools.as_path(), Path::new("/usr/bin"), Path::new("/bin")])?;
    if path.to_string_lossy().split(':').any(|d| Path::new(d).join("etcdutl").exists()) {
        anyhow::bail!("this test needs a PATH without etcdutl; /usr/bin has one here");
    }
    let data = dir.path().join("member.etcd");
    let (_, peer) = peer_url();
    let args = [as_agent(&coordinator, &credentials), one_member(&id, &data, &peer)].concat();

    let out = crate::fixtures::ferry::agent_restore_with_path(&args, &path).await?;
    assert_restore_refused(&out, &["etcdutl 3.5.10"]);
    assert!(out.stderr.contains("--no-bump-revision"), "the error says how to go on without the bump: {}", out.stderr);
    assert!(!data.exists(), "a refused restore created {}", data.display());

    let out =
        crate::fixtures::ferry::agent_restore_with_path(&[args, vec!["--no-bump-revision".into()]].concat(), &path)
            .await?
            .ok()?;
    assert!(out.stderr.contains("silently miss changes"), "--no-bump-revision warns what it risks: {}", out.stderr);
    assert!(data.join("member").is_dir(), "restored without the bump");
    Ok(())
}
