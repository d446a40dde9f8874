//! Faults of the backup stores, injected for real: `s3s-fs` behind [`FaultProxy`] (slow, answering 5xx,
//! down at start or at commit, failing between the manifest write and the cleanup), a full disk under the
//! local store, and two deployments sharing one bucket and prefix. For each: no corrupt or partial backup
//! listed, no multipart upload left behind (s3s-fs's own view of its data dir, asked directly, not through
//! the proxy), no configuration lost, the status and a metric say what happened, and the next backup
//! succeeds once the fault is gone. The measured figures are printed as `FAULT …` lines and kept in
//! docs/FAULTS.md.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use crate::faults::{fill, Tmpfs};
use crate::fixtures::ferry::STATUS_ERROR;
use crate::fixtures::ports::free_port;
use crate::fixtures::s3::{S3Config, S3_CONFIG_ID, TEST_SECRET_KEY};
use crate::fixtures::s3_faults::{Answer, FaultProxy, Faults, Request, Rule, When};
use crate::fixtures::{
    assert_daemon_logs_clean, assert_same_kvs, files_under, manual_backup_yaml, poll_until, restore_and_read_raw,
    unix_now, zstd_decompress, Agent, Coordinator, CoordinatorOptions, EtcdCluster, S3Server, STATUS_OK, TEST_BUCKET,
    TEST_PREFIX,
};
use crate::observe::http_get;

const CLUSTER: &str = "prod";
const MIB: usize = 1024 * 1024;
/// A backup that fails retries each S3 call five times with backoff: allow for several such calls.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(180);

/// etcd, a coordinator whose S3 config points at a [`FaultProxy`] in front of `s3s-fs`, and its agent.
struct Rig {
    // Drop order: daemons before the servers they talk to.
    agents: Vec<Agent>,
    coordinator: Coordinator,
    proxy: FaultProxy,
    s3: S3Server,
    _etcd: EtcdCluster,
    metrics_port: u16,
    written: std::collections::HashMap<String, Vec<u8>>,
}

impl Rig {
    /// `mib` MiB of random (incompressible) values in etcd, 5 MiB parts.
    async fn start(mib: usize) -> anyhow::Result<Self> {
        let s3 = S3Server::start().await?;
        let proxy = FaultProxy::start(s3.port()).await?;
        let etcd = EtcdCluster::start(1).await?;
        let written = etcd.put_random_values(mib * MIB, 7).await?;
        let metrics_port = free_port();
        let metrics = format!("127.0.0.1:{metrics_port}");
        let options = CoordinatorOptions::s3(&["--upload-part-size-mib", "5", "--metrics-listen", &metrics]);
        let coordinator = Coordinator::start(options).await?;
        let config = S3Config { endpoint: proxy.endpoint(), ..s3.config() };
        coordinator.ctl().apply_yaml(&config.to_yaml()).await?.ok().context("apply the S3 config")?;
        let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
        Ok(Self { agents, coordinator, proxy, s3, _etcd: etcd, metrics_port, written })
    }

    /// Takes a manual backup and waits until it is final (ok or not); returns the status spec and how long
    /// it took.
    async fn backup(&self) -> anyhow::Result<(Value, Duration)> {
        backup_once(&self.coordinator).await
    }

    /// A backup that must succeed.
    async fn backup_ok(&self) -> anyhow::Result<Duration> {
        let (status, took) = self.backup().await?;
        anyhow::ensure!(status["status"] == STATUS_OK, "backup failed: {status:#}");
        Ok(took)
    }

    /// A backup that must fail; returns its error.
    async fn backup_fails(&self) -> anyhow::Result<String> {
        let (status, _) = self.backup().await?;
        anyhow::ensure!(status["status"] == STATUS_ERROR, "the backup should have failed: {status:#}");
        let error = status["error"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(!error.is_empty(), "a failed backup says why: {status:#}");
        Ok(error)
    }

    /// `ferry_backups_total{cluster="prod",result=…}`.
    fn backups_metric(&self, result: &str) -> anyhow::Result<f64> {
        let (_, body) = http_get(self.metrics_port, "/metrics")?;
        let want = format!("result=\"{result}\"");
        Ok(body
            .lines()
            .filter(|l| l.starts_with("ferry_backups_total{") && l.contains(&want) && l.contains(CLUSTER))
            .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0))
    }

    /// Every key in the bucket, asked of `s3s-fs` directly (not through the proxy).
    async fn keys(&self) -> anyhow::Result<Vec<String>> {
        self.s3.aws()?.list_keys(TEST_BUCKET, "").await
    }

    /// The invariants after any fault, once the fault is gone: every listed backup's manifest and object
    /// are in the bucket and nothing else is (no object without its manifest), no multipart upload is
    /// left, and the S3 config is the one applied. Returns the listed ids.
    async fn assert_consistent(&self) -> anyhow::Result<Vec<String>> {
        poll_until(
            "no unfinished multipart upload in s3s-fs",
            Duration::from_secs(90),
            Duration::from_millis(250),
            || async {
                let left = self.s3.leftover_uploads();
                if left.is_empty() {
                    Ok(Some(()))
                } else {
                    anyhow::bail!("left: {left:?}")
                }
            },
        )
        .await?;
        let listed = self.coordinator.backups(CLUSTER).await?;
        let mut expected = Vec::new();
        let mut ids = Vec::new();
        for b in &listed {
            let object = b["spec"]["snapshot"].as_str().context("spec.snapshot")?.to_owned();
            expected.push(object.replace(".snapshot.zst", ".manifest.json"));
            expected.push(object);
            ids.push(b["metadata"]["id"].as_str().unwrap_or_default().to_owned());
        }
        expected.sort();
        assert_eq!(self.keys().await?, expected, "the bucket holds exactly the listed backups");
        let config = self.coordinator.ctl().get_json("etcdbackups3config", Some(S3_CONFIG_ID)).await?;
        assert_eq!(config["spec"]["endpoint"], self.proxy.endpoint(), "the S3 config is kept");
        Ok(ids)
    }

    /// Restores the newest backup's object (fetched with `aws` from `s3s-fs`) with etcd's own tools and
    /// compares it with what was written.
    async fn assert_newest_restores(&self) -> anyhow::Result<()> {
        let listed = self.coordinator.backups(CLUSTER).await?;
        let key = listed.first().and_then(|b| b["spec"]["snapshot"].as_str()).context("a listed backup")?;
        let object = self.coordinator.dir().join("fetched.snapshot.zst");
        let snapshot = self.coordinator.dir().join("fetched.snapshot");
        self.s3.aws()?.download(TEST_BUCKET, key, &object).await?;
        zstd_decompress(&object, &snapshot).await?;
        let restored = restore_and_read_raw(&snapshot).await?;
        let restored = restored.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
        assert_same_kvs(&self.written, &restored, "the backup taken through the fault restores");
        std::fs::remove_file(&object)?;
        std::fs::remove_file(&snapshot)?;
        Ok(())
    }

    /// UploadPart attempts the proxy saw, by part number.
    fn part_attempts(&self) -> std::collections::BTreeMap<u32, u32> {
        let mut out = std::collections::BTreeMap::new();
        for n in self.proxy.seen().iter().filter_map(|s| part_number(&s.request)) {
            *out.entry(n).or_insert(0) += 1;
        }
        out
    }
}

/// Takes a manual backup of [`CLUSTER`] and waits until it is final (ok or not); returns the status spec
/// and how long it took.
pub(crate) async fn backup_once(coordinator: &Coordinator) -> anyhow::Result<(Value, Duration)> {
    let before = coordinator.backup_status(CLUSTER).await.unwrap_or(Value::Null);
    // Manual backups are keyed by their second.
    let at = unix_now();
    while unix_now() <= at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
    let status = if before["lastbackupattempt"].is_null() {
        coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?
    } else {
        coordinator.wait_next_backup_status(CLUSTER, &before, BACKUP_TIMEOUT).await?
    };
    Ok((status, started.elapsed()))
}

/// The part number of an UploadPart request.
pub(crate) fn part_number(r: &Request) -> Option<u32> {
    if !r.is_upload_part() {
        return None;
    }
    r.query.split('&').find_map(|kv| kv.strip_prefix("partNumber=")).and_then(|n| n.parse().ok())
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/PID/status")?;
    Ok(kib * 1024)
}

#[tokio::test]
async fn s3_slow_backup_completes_with_bounded_agent_memory() -> anyhow::Result<()> {
    const RATE: u64 = 2 * MIB as u64;
    let rig = Rig::start(12).await?;
    let fast = rig.backup_ok().await?;
    rig.proxy.set(Faults { bytes_per_sec: Some(RATE), latency: Duration::from_millis(50), ..Faults::default() });
    let slow = rig.backup_ok().await?;
    let listed = rig.coordinator.backups(CLUSTER).await?;
    let size = listed[0]["spec"]["size"].as_u64().context("spec.size")?;
    // The parts go up at the cap (the coordinator reads back a few KiB of the object, not all of it).
    let floor = Duration::from_secs_f64(size as f64 / RATE as f64);
    assert!(slow > floor && slow > fast, "capped at 2 MiB/s the backup takes longer: {slow:?} (uncapped {fast:?})");
    let pid = rig.agents[0].pid().context("agent pid")?;
    let rss = peak_rss(pid)?;
    // 5 MiB parts, 3 in flight: the agent buffers at most about 4 parts whatever the link's speed.
    assert!(rss < 96 * MIB as u64, "agent peak RSS {} MiB", rss / MIB as u64);
    rig.proxy.set(Faults::default());
    let after = rig.backup_ok().await?;
    assert_eq!(rig.assert_consistent().await?.len(), 3);
    rig.assert_newest_restores().await?;
    assert_daemon_logs_clean(&rig.coordinator, &rig.agents);
    eprintln!(
        "FAULT s3-slow: {size} B backup {fast:?} uncapped, {slow:?} at 2 MiB/s + 50 ms, {after:?} after; agent VmHWM {} MiB",
        rss / MIB as u64
    );
    Ok(())
}

#[tokio::test]
async fn s3_5xx_on_parts_is_retried_and_exhausted_retries_fail_cleanly() -> anyhow::Result<()> {
    let rig = Rig::start(16).await?;
    // Every second UploadPart answered 503 SlowDown: each part's retry gets through.
    let flaky = Rule::new(Request::is_upload_part, When::Every(2), Answer::Status(503));
    rig.proxy.set(Faults { rules: vec![flaky.clone()], ..Faults::default() });
    let took = rig.backup_ok().await?;
    let attempts = rig.part_attempts();
    assert!(flaky.hits() >= 1, "the proxy failed some parts");
    // Ferry's own retries only (the SDK's are off): never more than its five attempts per part.
    assert!(attempts.values().all(|n| *n <= 5), "bounded retries per part: {attempts:?}");
    assert!(attempts.values().sum::<u32>() >= attempts.len() as u32 + flaky.hits(), "each failed part was retried");
    rig.assert_newest_restores().await?;

    // Every attempt at part 1 answered 500: the agent gives up after its attempts, the backup fails.
    let before = rig.proxy.seen().len();
    let dead = Rule::new(|r: &Request| part_number(r) == Some(1), When::Always, Answer::Status(500));
    rig.proxy.set(Faults { rules: vec![dead.clone()], ..Faults::default() });
    let errors_before = rig.backups_metric("error")?;
    let error = rig.backup_fails().await?;
    assert!(error.contains("500") || error.contains("InternalError"), "the error names the S3 answer: {error}");
    let tries = rig.proxy.seen()[before..].iter().filter(|s| s.request.is_upload_part()).count();
    assert!((2..=5).contains(&dead.hits()), "part 1 tried a bounded number of times: {}", dead.hits());
    assert_eq!(rig.backups_metric("error")?, errors_before + 1.0, "the failure is counted");
    rig.proxy.set(Faults::default());
    let recovered = Instant::now();
    rig.backup_ok().await?;
    let recovered = recovered.elapsed();
    assert_eq!(rig.assert_consistent().await?.len(), 2, "the failed backup is not listed");
    assert_daemon_logs_clean(&rig.coordinator, &rig.agents);
    eprintln!(
        "FAULT s3-5xx: every 2nd part 503 -> ok in {took:?}, attempts per part {attempts:?}; part 1 always 500 -> failed after {} attempts ({tries} part requests); next ok in {recovered:?}",
        dead.hits()
    );
    Ok(())
}

#[tokio::test]
async fn s3_down_at_start_fails_clearly_and_the_next_backup_succeeds() -> anyhow::Result<()> {
    let rig = Rig::start(4).await?;
    rig.proxy.set(Faults { down: true, ..Faults::default() });
    let failed_at = Instant::now();
    let error = rig.backup_fails().await?;
    let failed_after = failed_at.elapsed();
    assert!(error.contains("unreachable"), "the error says S3 is unreachable: {error}");
    assert_eq!(rig.backups_metric("error")?, 1.0);
    // While S3 is down the listing cannot be read: a server failure (exit 2), not an empty list.
    let listed_at = Instant::now();
    let listing = rig.coordinator.ctl().run(&["get", "etcdbackup"]).await?;
    let listing_took = listed_at.elapsed();
    assert_eq!(listing.status.code(), Some(2), "listing while S3 is down: {listing:?}");
    // Within the retries' budget (5 attempts, ~6 s of waits), not a hung request's 30 s.
    assert!(listing_took < Duration::from_secs(25), "the listing was refused after {listing_took:?}");
    rig.proxy.set(Faults::default());
    let back = Instant::now();
    rig.backup_ok().await?;
    let recovered = back.elapsed();
    assert_eq!(rig.assert_consistent().await?.len(), 1);
    assert_daemon_logs_clean(&rig.coordinator, &rig.agents);
    eprintln!(
        "FAULT s3-down-at-start: failed after {failed_after:?}: {error}; listing refused after {listing_took:?}; next backup ok {recovered:?} after S3 is back"
    );
    Ok(())
}

/// The S3 key Ferry holds was right, then S3 stopped accepting it (revoked, rotated at the provider).
#[tokio::test]
async fn s3_credentials_revoked_after_they_worked_fail_by_name_and_the_next_backup_succeeds() -> anyhow::Result<()> {
    let mut rig = Rig::start(4).await?;
    rig.backup_ok().await?;
    rig.s3.start_again_with_secret("rotated-secret-Zp4wQ9").await?;
    let error = rig.backup_fails().await?;
    let lower = error.to_lowercase();
    assert!(
        lower.contains("signature") || lower.contains("access denied") || lower.contains("credentials"),
        "the error says S3 refused the credentials: {error}"
    );
    assert_eq!(rig.backups_metric("error")?, 1.0);
    // The S3 configuration is kept (secret redacted), nothing partial listed.
    let s3 = rig.coordinator.ctl().get_json("etcdbackups3config", Some(S3_CONFIG_ID)).await?;
    assert_eq!(s3["spec"]["secretaccesskey"], "***", "config kept: {s3:#}");
    rig.s3.start_again_with_secret(TEST_SECRET_KEY).await?;
    let back = Instant::now();
    rig.backup_ok().await?;
    let recovered = back.elapsed();
    assert_eq!(rig.assert_consistent().await?.len(), 2, "the first and the last backup, nothing between");
    eprintln!("FAULT s3-credentials-revoked: {error}; next backup ok {recovered:?} after the key is accepted again");
    Ok(())
}

#[tokio::test]
async fn s3_down_at_commit_aborts_the_upload_and_lists_nothing() -> anyhow::Result<()> {
    let rig = Rig::start(12).await?;
    // CompleteMultipartUpload cut every time, and the abort that follows too, five times: the abort is
    // retried later.
    let complete = Rule::new(Request::is_complete_upload, When::Always, Answer::Close);
    let abort =
        Rule::new(|r: &Request| r.method == "DELETE" && r.query.contains("uploadId="), When::First(5), Answer::Close);
    rig.proxy.set(Faults { rules: vec![complete.clone(), abort.clone()], ..Faults::default() });
    let error = rig.backup_fails().await?;
    assert!(error.contains("complete multipart upload"), "the error names the commit step: {error}");
    poll_until("the abort to be tried", Duration::from_secs(60), Duration::from_millis(250), || async {
        Ok((abort.hits() == 5).then_some(()))
    })
    .await?;
    assert!(!rig.s3.leftover_uploads().is_empty(), "the upload is still there while its abort fails");
    assert!(rig.coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");

    // The manifest PUT refused (S3 answers 500): the completed object is deleted, nothing listed.
    let manifest = Rule::new(|r: &Request| r.is("PUT", ".manifest.json"), When::Always, Answer::Status(500));
    rig.proxy.set(Faults { rules: vec![manifest.clone()], ..Faults::default() });
    let error = rig.backup_fails().await?;
    assert!(error.contains("write manifest"), "the error names the manifest write: {error}");
    assert!(manifest.hits() >= 1);
    assert!(rig.coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");

    rig.proxy.set(Faults::default());
    let back = Instant::now();
    rig.backup_ok().await?;
    let recovered = back.elapsed();
    // The abort left for later ran before that backup: no part of the first failed upload remains.
    assert_eq!(rig.assert_consistent().await?.len(), 1, "only the good backup is in the bucket");
    assert_eq!(rig.backups_metric("error")?, 2.0);
    assert_daemon_logs_clean(&rig.coordinator, &rig.agents);
    eprintln!("FAULT s3-down-at-commit: complete cut x{}, abort cut x5 then retried; manifest PUT 500 x{}; next ok in {recovered:?}", complete.hits(), manifest.hits());
    Ok(())
}

/// Issue 29: a part changed on its way to S3 (one byte of an UploadPart body flipped, the signed headers
/// kept) is never committed. A store that checks the signed `Content-MD5` / `x-amz-checksum-sha256` refuses
/// the upload itself (BadDigest); s3s-fs 0.14.1 checks neither and lists sizes only, so the coordinator's
/// comparison before completing refuses it: the store answered that part's upload with the MD5 of other
/// bytes than the agent announced. Either way the backup fails cleanly and the next one succeeds.
#[tokio::test]
async fn a_part_changed_on_its_way_to_s3_is_refused_and_nothing_is_kept() -> anyhow::Result<()> {
    let rig = Rig::start(12).await?;
    let tamper = Rule::new(|r: &Request| part_number(r) == Some(2), When::First(1), Answer::Tamper);
    rig.proxy.set(Faults { rules: vec![tamper.clone()], ..Faults::default() });
    let error = rig.backup_fails().await?;
    assert_eq!(tamper.hits(), 1, "part 2 went through the proxy changed");
    assert!(
        error.contains("part 2 is not the part the agent announced") || error.contains("BadDigest"),
        "the status says which part was refused: {error}"
    );
    assert!(rig.coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");
    assert!(rig.assert_consistent().await?.is_empty(), "no object, no manifest, no upload left");
    assert_eq!(rig.backups_metric("error")?, 1.0, "the failure is counted");

    rig.proxy.set(Faults::default());
    rig.backup_ok().await?;
    assert_eq!(rig.assert_consistent().await?.len(), 1);
    rig.assert_newest_restores().await?;
    assert_daemon_logs_clean(&rig.coordinator, &rig.agents);
    eprintln!("FAULT s3-part-tampered: one byte of part 2 flipped in flight -> refused: {error}");
    Ok(())
}

#[tokio::test]
async fn a_failure_between_the_manifest_write_and_the_cleanup_never_lists_a_manifest_without_its_object(
) -> anyhow::Result<()> {
    let rig = Rig::start(4).await?;
    // The manifest PUT reaches S3 (the manifest is written) but the coordinator hears 503: the commit fails.
    // Then the cleanup's DELETE of that manifest fails its five attempts. Deleting the object anyway would
    // leave a listed manifest whose object is gone.
    let put = Rule::new(|r: &Request| r.is("PUT", ".manifest.json"), When::Always, Answer::StatusAfterForward(503));
    let delete = Rule::new(|r: &Request| r.is("DELETE", ".manifest.json"), When::First(5), Answer::Status(503));
    rig.proxy.set(Faults { rules: vec![put.clone(), delete.clone()], ..Faults::default() });
    rig.coordinator.manual_backup(CLUSTER).await?;
    // Watch the bucket itself while the commit fails: a manifest is never there without its object.
    let deadline = Instant::now() + BACKUP_TIMEOUT;
    let mut saw_manifest = false;
    loop {
        let keys = rig.keys().await?;
        for m in keys.iter().filter(|k| k.ends_with(".manifest.json")) {
            saw_manifest = true;
            let object = m.replace(".manifest.json", ".snapshot.zst");
            assert!(keys.contains(&object), "manifest {m} is in the bucket without its object: {keys:?}");
        }
        let status = rig.coordinator.backup_status(CLUSTER).await?;
        if status["status"] == STATUS_ERROR && delete.hits() >= 5 {
            break;
        }
        anyhow::ensure!(status["status"] != STATUS_OK, "the commit should fail: {status:#}");
        anyhow::ensure!(Instant::now() < deadline, "no final status: {status:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_manifest && put.hits() >= 1, "the manifest reached the bucket");
    assert_eq!(rig.backups_metric("error")?, 1.0, "the failure is counted");
    // What is listed meanwhile is whole: the manifest and the object it names.
    for b in rig.coordinator.backups(CLUSTER).await? {
        let key = b["spec"]["snapshot"].as_str().context("spec.snapshot")?;
        rig.s3.aws()?.head(TEST_BUCKET, key).await.context("a listed backup's object is there")?;
    }

    rig.proxy.set(Faults::default());
    let back = Instant::now();
    // The cleanup left for later runs before the next backup: manifest first, then the object.
    rig.backup_ok().await?;
    let recovered = back.elapsed();
    assert_eq!(rig.assert_consistent().await?.len(), 1, "only the good backup remains");
    let log = std::fs::read_to_string(rig.coordinator.log_path())?;
    assert!(log.contains("removed what a failed backup had left in the bucket"), "the late cleanup is logged");
    assert_daemon_logs_clean(&rig.coordinator, &rig.agents);
    eprintln!("FAULT manifest-then-cleanup: manifest PUT answered 503 x{} (written), its DELETE 503 x5; cleaned up before the next backup, ok in {recovered:?}", put.hits());
    Ok(())
}

#[tokio::test]
async fn local_store_disk_full_fails_the_backup_and_recovers_once_space_is_back() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_random_values(4 * MIB, 11).await?;
    let metrics_port = free_port();
    let mut coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{metrics_port}")],
        ..Default::default()
    })
    .await?;
    assert!(coordinator.stop().await, "the coordinator stops on SIGTERM");
    let store = coordinator.store_dir();
    let Some(_tmpfs) = Tmpfs::mount(&store, 16 * MIB as u64) else {
        eprintln!(
            "skipped: mounting a tmpfs needs root (the disk-full fault is injected with a real small filesystem)"
        );
        return Ok(());
    };
    coordinator.restart(crate::fixtures::Stop::Kill).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let filler = fill(&store)?;
    // Room for the cluster dir, not for the backup.
    let f = std::fs::OpenOptions::new().write(true).open(&filler)?;
    f.set_len(f.metadata()?.len() - 256 * 1024)?;
    drop(f);

    let (failed, _) = backup_once(&coordinator).await?;
    assert_eq!(failed["status"], STATUS_ERROR, "{failed:#}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("disk of the local backup store is full"), "the error names the full disk: {error}");
    let left: Vec<_> = files_under(&store)?.into_iter().filter(|p| *p != filler).collect();
    assert!(left.is_empty(), "no partial object left: {left:?}");
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");
    // The state store (on another disk) is unaffected: configuration still applies.
    assert_eq!(http_get(metrics_port, "/readyz")?.0, 200, "the coordinator stays ready");
    let errors = http_get(metrics_port, "/metrics")?.1;
    assert!(
        errors
            .lines()
            .any(|l| l.starts_with("ferry_backups_total{") && l.contains("result=\"error\"") && l.ends_with(" 1")),
        "the failure is counted"
    );

    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    let (ok, _) = backup_once(&coordinator).await?;
    assert_eq!(ok["status"], STATUS_OK, "{ok:#}");
    let recovered = freed.elapsed();
    assert_eq!(coordinator.backups(CLUSTER).await?.len(), 1);
    eprintln!("FAULT local-store-full: {error}; next backup ok {recovered:?} after space was freed");
    Ok(())
}

#[tokio::test]
async fn two_deployments_sharing_a_bucket_and_prefix_each_see_only_their_own_backups() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    // Two deployments (each its own CA, so its own deployment id), one bucket, one prefix, one cluster name.
    let a = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let b = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let _a_agents = a.start_agents(CLUSTER, &etcd).await?;
    let _b_agents = b.start_agents(CLUSTER, &etcd).await?;
    a.manual_backup(CLUSTER).await?;
    let a_status = a.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert_eq!(a_status["status"], STATUS_OK, "{a_status:#}");
    b.manual_backup(CLUSTER).await?;
    let b_status = b.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert_eq!(b_status["status"], STATUS_OK, "{b_status:#}");

    let a_list = a.backups(CLUSTER).await?;
    let b_list = b.backups(CLUSTER).await?;
    assert_eq!(a_list.len(), 1, "A lists only its own: {a_list:#?}");
    assert_eq!(b_list.len(), 1, "B lists only its own: {b_list:#?}");
    let a_id = a_list[0]["metadata"]["id"].as_str().context("id")?.to_owned();
    let b_id = b_list[0]["metadata"]["id"].as_str().context("id")?.to_owned();
    assert_ne!(a_id, b_id, "the ids never collide: the second deployment took the next free one");
    assert_eq!(s3.aws()?.list_keys(TEST_BUCKET, "").await?.len(), 4, "both backups are in the bucket");

    // Neither restores nor downloads the other's, by id or as `latest`.
    let out = b.try_download(&a_id).await?;
    assert_eq!(out.status.code(), Some(1), "B refuses A's backup: {out:?}");
    assert!(out.stderr.contains("written by deployment"), "and says why: {}", out.stderr);
    let latest = b.dir().join("latest.zst");
    b.download_backup(CLUSTER, "latest", &latest, false).await?;
    let spec = &b_list[0]["spec"];
    assert_eq!(Some(crate::fixtures::file_len(&latest)?), spec["size"].as_u64(), "B's latest is its own");
    let log = std::fs::read_to_string(b.log_path())?;
    assert!(log.contains("shares this store's bucket and prefix"), "B warns about the sharing");
    Ok(())
}

impl Coordinator {
    /// `backup download prod ID -o …` as it came out (success or not).
    async fn try_download(&self, id: &str) -> anyhow::Result<crate::fixtures::CtlOutput> {
        let out = self.dir().join(format!("{id}.zst"));
        self.ctl().run(&["backup", "download", CLUSTER, id, "-o", &out.display().to_string()]).await
    }
}

/// A stalled S3 (connections accepted, requests never answered) held `get etcdbackup` for the long attempt
/// timeout of large transfers, 120 s per attempt, about 10 minutes per call (issue 26, finding 14). Listings,
/// HEADs and manifest reads now give an attempt 10 s: two stalled listings cost about 20 s, and the third
/// attempt answers.
#[tokio::test]
async fn a_stalled_s3_costs_a_listing_seconds_not_minutes() -> anyhow::Result<()> {
    let rig = Rig::start(1).await?;
    rig.backup_ok().await?;
    let listing =
        Rule::new(|r: &Request| r.method == "GET" && r.query.contains("list-type=2"), When::First(2), Answer::Stall);
    rig.proxy.set(Faults { rules: vec![listing.clone()], ..Faults::default() });
    let started = Instant::now();
    let listed = rig.coordinator.ctl().list_json("etcdbackup", None).await.context("the third attempt answers")?;
    let took = started.elapsed();
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listing.hits(), 2, "both stalls were met");
    assert!(took < Duration::from_secs(40), "two stalled listings took {took:?}");
    eprintln!("FAULT s3-stalled-listing: two stalled attempts, listing answered after {took:?}");
    Ok(())
}
