//! Proof, not hope: scheduled restore drills (the newest backup restored into a throw-away etcd and read
//! back), their sanity check against the previous drill, retention keeping the last proved backup, and the
//! check before a backup that every member holds the same data.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::encryption::{age_identity, encrypt_to};
use crate::fixtures::etcd::connect;
use crate::fixtures::ferry::STATUS_ERROR;
use crate::fixtures::logs::log_tail;
use crate::fixtures::ports::free_port;
use crate::fixtures::{
    assert_no_unexpected_errors, poll_until, restore_and_read_raw, test_dir, zstd_decompress, Agent, Coordinator,
    CoordinatorOptions, EtcdCluster, S3Server, STATUS_OK, TEST_PREFIX,
};
use crate::observe::http_get;

const CLUSTER: &str = "prod";
/// `drill.result` when the backup restored but a resource lost many keys since the drill before.
const DRILL_WARNING: i64 = 4;
const DRILL_TIMEOUT: Duration = Duration::from_secs(120);
const BACKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A coordinator that allows drills every second, with metrics on a port.
async fn coordinator() -> anyhow::Result<(Coordinator, u16)> {
    let port = free_port();
    let c = Coordinator::start(CoordinatorOptions { extra_args: drill_args(port), ..Default::default() }).await?;
    Ok((c, port))
}

/// Drills every second allowed, metrics on `port`.
fn drill_args(port: u16) -> Vec<String> {
    ["--min-drill-interval", "1s", "--metrics-listen", &format!("127.0.0.1:{port}")].map(str::to_owned).to_vec()
}

/// Sets the cluster's backup configuration (hourly backups, so only the tests' manual backups run).
async fn configure(c: &Coordinator, drill_seconds: i64, retention: Option<Value>) -> anyhow::Result<()> {
    let mut cluster = c.ctl().get_json("cluster", Some(CLUSTER)).await?;
    let mut cfg = json!({
        "interval": { "seconds": 3600, "nanos": 0 },
        "drillinterval": { "seconds": drill_seconds, "nanos": 0 },
    });
    if let Some(r) = retention {
        cfg["retention"] = r;
    }
    cluster["spec"]["backupconfiguration"] = cfg;
    c.ctl().apply_yaml(&serde_json::to_string(&cluster)?).await?.ok()?;
    Ok(())
}

/// Waits for a drill of `backup` (any backup when `None`) that `done` accepts; returns the drill status.
async fn wait_drill(c: &Coordinator, backup: Option<&str>, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    poll_until("a restore drill", DRILL_TIMEOUT, Duration::from_millis(500), || async {
        let drill = c.backup_status(CLUSTER).await?["drill"].clone();
        let of_backup = backup.is_none_or(|b| drill["backup"] == b);
        Ok((of_backup && done(&drill)).then_some(drill))
    })
    .await
    .with_context(|| format!("coordinator log:\n{}", log_tail(c.log_path(), 40)))
}

/// A new manual backup, which must succeed; returns its id.
async fn backup(c: &Coordinator, previous: Option<&Value>) -> anyhow::Result<(String, Value)> {
    if previous.is_some() {
        // A manual backup is asked for by the second (and backup ids are per second): the next one, later.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    c.manual_backup(CLUSTER).await?;
    let status = match previous {
        Some(p) => c.wait_next_backup_status(CLUSTER, p, BACKUP_TIMEOUT).await?,
        None => c.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?,
    };
    anyhow::ensure!(status["status"] == STATUS_OK, "backup failed: {status}");
    let id = c.backups(CLUSTER).await?.first().context("no backup listed")?["metadata"]["id"]
        .as_str()
        .context("backup id")?
        .to_owned();
    Ok((id, status))
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics").ok()?;
    let prefix = format!("{name}{{cluster=\"{CLUSTER}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn a_drill_restores_the_newest_backup_reports_its_keys_and_a_corrupted_object_fails_it() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(200).await?;
    let (c, port) = coordinator().await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    let (id, _) = backup(&c, None).await?;
    configure(&c, 2, None).await?;

    let drill = wait_drill(&c, Some(&id), |d| d["result"] == STATUS_OK).await?;
    assert_eq!(drill["resources"]["test"], 200, "every key written is read back from the restored etcd: {drill}");
    assert!(drill["keys"].as_u64().is_some_and(|k| k >= 200), "{drill}");
    assert!(drill["revision"].as_i64().is_some_and(|r| r > 1), "{drill}");
    assert_eq!(drill["lastpassedbackup"], id.as_str(), "{drill}");
    poll_until("drill metrics", Duration::from_secs(20), Duration::from_millis(300), || async {
        Ok((metric(port, "ferry_restore_drill_keys") == drill["keys"].as_f64()
            && metric(port, "ferry_restore_drill_failing") == Some(0.0)
            && metric(port, "ferry_restore_drill_last_success_timestamp_seconds").is_some())
        .then_some(()))
    })
    .await?;
    let table = c.ctl().run(&["get", "etcdbackupstatus", CLUSTER]).await?.ok()?.stdout;
    assert!(table.contains("LAST DRILL") && table.contains("Ok"), "{table}");

    // One bit flipped in the stored object: the next drill fails on its hash, and says so.
    let object = c.store_dir().join(CLUSTER).join(format!("{id}.snapshot.zst"));
    let mut bytes = std::fs::read(&object).with_context(|| format!("read {}", object.display()))?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&object, bytes)?;
    let failed = wait_drill(&c, Some(&id), |d| d["result"] == STATUS_ERROR).await?;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("sha256") && error.contains("corrupted"), "{failed}");
    assert_eq!(failed["lastpassedbackup"], id.as_str(), "the last proof is remembered");
    poll_until("drill failure metric", Duration::from_secs(20), Duration::from_millis(300), || async {
        Ok((metric(port, "ferry_restore_drill_failing") == Some(1.0)).then_some(()))
    })
    .await?;
    // Scratch dirs (a copy of the cluster's data) do not outlive their drill.
    poll_until("no scratch dir left", Duration::from_secs(20), Duration::from_millis(300), || async {
        let left: Vec<_> = std::fs::read_dir(c.state_dir().join("drills"))?.collect();
        Ok(left.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_drill_after_most_keys_were_deleted_warns_and_retention_keeps_the_last_proved_backup() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(200).await?;
    let (c, port) = coordinator().await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    let (first, status) = backup(&c, None).await?;
    configure(&c, 1, Some(json!({ "keeplast": 1 }))).await?;
    wait_drill(&c, Some(&first), |d| d["result"] == STATUS_OK).await?;

    // Half the keys gone (an emptied namespace, a bad script): the backup is fine, its content is not.
    let mut client = etcd.client().await?;
    client.delete(format!("{TEST_PREFIX}key-000"), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    let (second, status) = backup(&c, Some(&status)).await?;
    let warned = wait_drill(&c, Some(&second), |d| d["result"] == DRILL_WARNING).await?;
    let warning = warned["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("test 200 → 100") && warning.contains(&first), "{warned}");
    assert_eq!(warned["lastpassedbackup"], first.as_str(), "a warned drill does not count as proof: {warned}");
    poll_until("key drop metric", Duration::from_secs(20), Duration::from_millis(300), || async {
        Ok((metric(port, "ferry_restore_drill_key_drop") == Some(1.0)).then_some(()))
    })
    .await?;

    // keeplast 1 would leave only the newest backup; the last one a drill proved stays too.
    let (third, _) = backup(&c, Some(&status)).await?;
    let ids: Vec<String> =
        c.backups(CLUSTER).await?.iter().filter_map(|b| b["metadata"]["id"].as_str().map(str::to_owned)).collect();
    assert!(ids.contains(&first) && ids.contains(&third), "{ids:?}");
    assert!(!ids.contains(&second), "retention deleted the unproved one: {ids:?}");
    Ok(())
}

#[tokio::test]
async fn an_agent_reaching_an_etcd_with_other_data_is_caught_and_never_backed_up_from() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(100).await?;
    // Another etcd cluster, with other data: "m3"'s agent is (mis)pointed at it.
    let other = EtcdCluster::start(1).await?;
    other.put_keys(7).await?;
    let (c, port) = coordinator().await?;
    let mut agents = Vec::new();
    for (i, member) in etcd.members().iter().enumerate() {
        let creds = c.issue_agent_credentials(CLUSTER, member.name()).await?;
        let url = if i == 2 { other.member(0).client_url() } else { member.client_url() };
        agents.push(Agent::start(&c, &creds, url)?);
    }
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;

    backups_never_from_m3(&c, port, "another etcd cluster", None).await?;
    Ok(())
}

/// Three backups in a row, none from m3: each member check names m3 alone as diverged, saying `why`; every
/// manifest names another member; the metric says m3 diverged. Returns the backups, newest first.
async fn backups_never_from_m3(
    c: &Coordinator,
    port: u16,
    why: &str,
    mut previous: Option<Value>,
) -> anyhow::Result<Vec<Value>> {
    for _ in 0..3 {
        let (_, status) = backup(c, previous.as_ref()).await?;
        assert_ne!(status["member"], "m3", "a backup was taken from the diverged member: {status}");
        let check = &status["membercheck"];
        assert_eq!(check["diverged"], json!(["m3"]), "{status}");
        let message = check["message"].as_str().unwrap_or_default();
        assert!(message.contains("member m3 diverged") && message.contains(why), "{status}");
        assert!(check["revision"].as_i64().is_some_and(|r| r > 0), "{status}");
        previous = Some(status);
    }
    // The three newest (listings are newest first).
    let backups: Vec<Value> = c.backups(CLUSTER).await?.into_iter().take(3).collect();
    let members: Vec<&str> = backups.iter().filter_map(|b| b["spec"]["member"].as_str()).collect();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| *m != "m3"), "every manifest names another member: {members:?}");
    let diverged = |member| member_diverged(port, member);
    assert_eq!((diverged("m1"), diverged("m2"), diverged("m3")), (Some(0.0), Some(0.0), Some(1.0)));
    Ok(backups)
}

/// `ferry_etcd_member_diverged{cluster, member}`.
fn member_diverged(port: u16, member: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics").ok()?;
    let prefix = format!("ferry_etcd_member_diverged{{cluster=\"{CLUSTER}\",member=\"{member}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok())
}

/// The key whose value is altered on one member's disk.
const MARKED_KEY: &str = "/registry/configmaps/default/marked";
/// Its value, as every member agreed on it; recognisable in the bbolt file.
const ORIGINAL: &[u8] = b"ferry-divergence-marker:ORIGINAL:the-value-the-cluster-agreed-on";
/// What the altered member's disk holds instead: the same length, so bbolt's pages and etcd's protobuf
/// record around it stay well-formed (bbolt data pages carry no checksum).
const ALTERED: &[u8] = b"ferry-divergence-marker:ALTERED!:the-value-the-cluster-agreed-on";

/// Replaces every occurrence of `from` in the file at `path` by `to` (the same length); how many there were.
fn replace_in_file(path: &std::path::Path, from: &[u8], to: &[u8]) -> anyhow::Result<usize> {
    anyhow::ensure!(from.len() == to.len(), "a replacement of another length would shift the pages");
    let mut bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut found = 0;
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(from.len()).position(|w| w == from) {
        bytes[at + i..at + i + from.len()].copy_from_slice(to);
        found += 1;
        at += i + from.len();
    }
    std::fs::write(path, &bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(found)
}

/// `MARKED_KEY` as served by the member at `url` alone, from its own data (a serializable read).
async fn marked_value_on(url: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut client = connect(&[url.to_owned()]).await?;
    let resp = client
        .get(MARKED_KEY, Some(etcd_client::GetOptions::new().with_serializable()))
        .await
        .map_err(|e| anyhow::anyhow!("read {MARKED_KEY} from {url}: {e:?}"))?;
    Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
}

/// A 3-member etcd whose m3 serves an altered value of `MARKED_KEY` from its own bbolt file.
async fn etcd_with_m3_altered() -> anyhow::Result<EtcdCluster> {
    let mut etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(100).await?;
    let mut client = etcd.client().await?;
    client.put(MARKED_KEY, ORIGINAL, None).await.map_err(|e| anyhow::anyhow!("put {MARKED_KEY}: {e:?}"))?;
    etcd.put_keys(100).await?;
    let victim = etcd.member(2).client_url().to_owned();
    poll_until("m3 to apply the marked key", Duration::from_secs(20), Duration::from_millis(100), || async {
        Ok((marked_value_on(&victim).await?.as_deref() == Some(ORIGINAL)).then_some(()))
    })
    .await?;

    // m3 stopped (SIGTERM: etcd commits its backend, so nothing of the marked key is left for its WAL replay to
    // write back), its bbolt file altered in place, and started again: etcd 3.5 does not check its data at
    // start unless told to (the fixture says --experimental-initial-corrupt-check=false), and comes up.
    etcd.stop_member(2).await?;
    let db = etcd.member(2).data_dir().join("member/snap/db");
    let replaced = replace_in_file(&db, ORIGINAL, ALTERED)?;
    assert!(replaced >= 1, "the marked value is not in {}", db.display());
    etcd.start_stopped_members().await?;
    // The altered bytes are key-value data, not a freed page: m3 serves them from its own disk; the others
    // serve what the cluster agreed on.
    assert_eq!(marked_value_on(&victim).await?.as_deref(), Some(ALTERED), "m3 reads its altered bbolt file");
    let healthy = etcd.member(0).client_url().to_owned();
    assert_eq!(marked_value_on(&healthy).await?.as_deref(), Some(ORIGINAL));
    Ok(etcd)
}

/// Waits until m3's agent reports a healthy follower: without the member check it would be one of the two
/// followers the scheduler rotates between, so one of any two backups in a row would come from it.
async fn wait_m3_follower(c: &Coordinator) -> anyhow::Result<()> {
    poll_until(
        "m3's agent to report a healthy follower",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async {
            let agents = c.connected_agents(CLUSTER).await?;
            let m3 = agents.iter().find(|a| a["spec"]["member"] == "m3").map(|a| &a["spec"]);
            Ok(m3.filter(|s| s["etcderror"] == "" && s["leader"] == false && s["etcdversion"] != "").map(|_| ()))
        },
    )
    .await
}

#[tokio::test]
async fn a_member_whose_bbolt_file_was_altered_on_disk_is_caught_by_hashkv_and_never_backed_up_from(
) -> anyhow::Result<()> {
    let etcd = etcd_with_m3_altered().await?;
    let (c, port) = coordinator().await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    wait_m3_follower(&c).await?;

    let backups = backups_never_from_m3(&c, port, "key space differs", None).await?;

    // The backup holds what the cluster agreed on, not m3's altered bytes.
    let id = backups.first().and_then(|b| b["metadata"]["id"].as_str()).context("backup id")?.to_owned();
    let dir = test_dir("divergence")?;
    let snapshot = dir.path().join("snapshot.db");
    zstd_decompress(&c.store_dir().join(CLUSTER).join(format!("{id}.snapshot.zst")), &snapshot).await?;
    let restored = restore_and_read_raw(&snapshot).await?;
    assert_eq!(restored.get(MARKED_KEY).map(Vec::as_slice), Some(ORIGINAL), "the restored value");
    assert_eq!(restored.keys().filter(|k| k.starts_with(TEST_PREFIX)).count(), 100);
    Ok(())
}

/// Issue 29: the member check never makes etcd hash its key space afresh (which holds etcd's backend, stalling
/// its writes for seconds on a large database). With the agents' scan limit at 0 every database is "large":
/// before any compaction nothing is compared and the backup goes on; once etcd compacts (kube-apiserver does
/// every 5 minutes) the members are compared at the hash etcd computed while compacting, and m3's altered data
/// is caught there.
#[tokio::test]
async fn members_are_compared_at_the_hashes_etcd_keeps_from_compacting_and_never_hashed_afresh_above_the_limit(
) -> anyhow::Result<()> {
    let etcd = etcd_with_m3_altered().await?;
    let (c, port) = coordinator().await?;
    let mut agents = Vec::new();
    for member in etcd.members() {
        let creds = c.issue_agent_credentials(CLUSTER, member.name()).await?;
        let args = ["--hashkv-scan-limit-mib".to_owned(), "0".to_owned()];
        agents.push(Agent::start_with_args(&c, &creds, member.client_url(), &args)?);
    }
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    wait_m3_follower(&c).await?;

    let (_, status) = backup(&c, None).await?;
    let check = &status["membercheck"];
    assert_eq!(check["diverged"], json!([]), "nothing compared, nobody excluded: {status}");
    assert_eq!(check["unreachable"], json!(["m1", "m2", "m3"]), "{status}");
    assert!(check["message"].as_str().unwrap_or_default().contains("would stall its writes"), "{status}");

    let mut client = etcd.client().await?;
    let revision = client.get("any", None).await.map_err(|e| anyhow::anyhow!("get: {e:?}"))?;
    let revision = revision.header().map(|h| h.revision()).context("revision")?;
    // An agent reports a compaction once it has seen it for a minute (etcd keeps the hash only when its
    // batched compaction has run).
    client.compact(revision, None).await.map_err(|e| anyhow::anyhow!("compact: {e:?}"))?;
    poll_until("every agent to see the compaction", Duration::from_secs(120), Duration::from_millis(500), || async {
        let agents = c.connected_agents(CLUSTER).await?;
        let seen = agents.iter().filter(|a| a["spec"]["hashedcompaction"] == revision).count();
        Ok((seen == 3).then_some(()))
    })
    .await?;
    // The first backup was taken before the compaction: its drill hashes the restored key space at the
    // compaction and compares it with the hash the *other* members' etcd kept (nobody hashes afresh).
    let first = c.backups(CLUSTER).await?[0]["metadata"]["id"].as_str().context("backup id")?.to_owned();
    configure(&c, 2, None).await?;
    let drill = wait_drill(&c, Some(&first), |d| d["time"].is_object()).await?;
    configure(&c, 3600, None).await?;
    if status["member"] == "m3" {
        assert_eq!(drill["result"], STATUS_ERROR, "m3's altered data is not what m1 and m2 hold: {drill}");
        assert!(drill["error"].as_str().unwrap_or_default().contains("not the data the cluster held"), "{drill}");
    } else {
        assert_eq!(drill["result"], STATUS_OK, "{drill}");
        let agreement = drill["agreement"].as_str().unwrap_or_default();
        assert!(
            agreement.starts_with("agrees with m") && agreement.contains(&format!("at revision {revision}")),
            "{drill}"
        );
        assert!(agreement.contains("differs from m3"), "m3's altered data differs: {drill}");
        assert_eq!(drill["lastpassedbackup"], first.as_str(), "{drill}");
    }
    let backups = backups_never_from_m3(&c, port, "key space differs", Some(status)).await?;
    let status = c.backup_status(CLUSTER).await?;
    assert_eq!(status["membercheck"]["revision"], revision, "compared at the compaction: {status}");
    assert_eq!(status["membercheck"]["unreachable"], json!([]), "{status}");
    assert!(backups.len() >= 3);
    for a in &agents {
        let log = std::fs::read_to_string(a.log_path())?;
        assert!(!log.contains("hashed its key space afresh"), "{}", a.log_path().display());
    }
    Ok(())
}

#[tokio::test]
async fn a_drill_of_an_encrypted_s3_backup_opens_it_with_the_coordinators_identity_and_counts_its_keys(
) -> anyhow::Result<()> {
    const KEYS: usize = 300;
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(KEYS).await?;
    let dir = test_dir("drill-s3")?;
    let (key, recipient) = age_identity(dir.path())?;
    let port = free_port();
    let mut args = drill_args(port);
    args.extend(["--identity".to_owned(), key.display().to_string()]);
    let c = Coordinator::start_s3(&s3, CoordinatorOptions { extra_args: args, ..CoordinatorOptions::s3(&[]) }).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    encrypt_to(&c, &[&recipient]).await?;
    let (id, _) = backup(&c, None).await?;
    let spec = &c.backups(CLUSTER).await?[0]["spec"];
    assert_eq!(spec["encryption"]["recipients"], json!([recipient]), "the S3 object is encrypted: {spec}");
    configure(&c, 2, None).await?;

    let drill = wait_drill(&c, Some(&id), |d| d["result"] == STATUS_OK).await?;
    assert_eq!(drill["resources"]["test"], KEYS, "every key written is read back from the restored etcd: {drill}");
    assert!(drill["keys"].as_u64().is_some_and(|k| k >= KEYS as u64), "{drill}");
    assert_eq!(drill["lastpassedbackup"], id.as_str(), "{drill}");
    poll_until("drill metrics", Duration::from_secs(20), Duration::from_millis(300), || async {
        Ok((metric(port, "ferry_restore_drill_keys") == drill["keys"].as_f64()).then_some(()))
    })
    .await?;
    assert_no_unexpected_errors(c.log_path(), &[]);
    Ok(())
}

/// Processes whose command line mentions `path` (a throw-away etcd on a drill's scratch dir names it).
fn processes_naming(path: &std::path::Path) -> Vec<String> {
    let needle = path.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .filter_map(Result::ok)
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[tokio::test]
async fn a_coordinator_stopping_mid_drill_waits_for_its_throw_away_etcd_and_leaves_no_copy_behind() -> anyhow::Result<()>
{
    let etcd = EtcdCluster::start(1).await?;
    // Enough data that restoring it and starting etcd on it take a moment to catch.
    etcd.put_random_values(32 << 20, 7).await?;
    let (mut c, _) = coordinator().await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    backup(&c, None).await?;
    configure(&c, 1, None).await?;

    // Caught while the restore runs (etcd's restore has made the data dir): SIGTERM.
    let drills = c.state_dir().join("drills");
    poll_until("a drill restoring", DRILL_TIMEOUT, Duration::from_millis(10), || async {
        let restoring = std::fs::read_dir(&drills)?.filter_map(Result::ok).any(|d| d.path().join("restored").exists());
        Ok(restoring.then_some(()))
    })
    .await?;
    assert!(c.stop().await, "the coordinator stopped on SIGTERM within the fixture's wait");
    let log = std::fs::read_to_string(c.log_path())?;
    assert!(
        log.contains("the drill is cancelled"),
        "the drill was running at SIGTERM:\n{}",
        log_tail(c.log_path(), 30)
    );
    let left: Vec<_> = std::fs::read_dir(&drills)?.filter_map(Result::ok).map(|d| d.path()).collect();
    assert!(left.is_empty(), "scratch dirs outlived the coordinator: {left:?}");
    assert_eq!(processes_naming(&drills), Vec::<String>::new(), "a throw-away etcd outlived the coordinator");
    Ok(())
}
