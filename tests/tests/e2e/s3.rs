//! The S3 backup store end to end, against a real S3 server (`s3s-fs`): config validation, backups that
//! restore with tools that are not Ferry (`aws`, `zstd`, `etcdctl`), multipart uploads, an S3 outage in the
//! middle of an upload, progress while a backup runs, and secrets kept out of every output.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::fixtures::ferry::{CoordinatorOptions, CtlOutput, STATUS_ERROR, STATUS_RUNNING};
use crate::fixtures::s3::{S3Config, S3_CONFIG_ID, S3_KEY_PREFIX, TEST_SECRET_KEY};
use crate::fixtures::{
    assert_daemon_logs_clean, assert_no_unexpected_errors, assert_same_kvs, expected_test_kvs, manual_backup_yaml,
    poll_until, ports, restore_and_read, restore_and_read_raw, unix_now, zstd_decompress, Coordinator, EtcdCluster,
    S3Server, STATUS_OK, TEST_BUCKET, TEST_PREFIX,
};

const CLUSTER: &str = "prod";
const MIB: usize = 1024 * 1024;
const BACKUP_TIMEOUT: Duration = Duration::from_secs(60);
const OVERALL_STATUS: (&str, &str) = ("etcdbackupoverallstatus", "etcdbackup-overall-status");
const S3_CONFIG_TYPE: &str = "etcdbackups3config";

/// The spec of the overall backup status (store name, config error, config attempts).
async fn overall_status(coordinator: &Coordinator) -> anyhow::Result<Value> {
    Ok(coordinator.ctl().get_json(OVERALL_STATUS.0, Some(OVERALL_STATUS.1)).await?["spec"].clone())
}

/// Asserts `ferryctl` failed with one `error: ...` line on stderr that contains `keyword`.
#[track_caller]
fn assert_one_line_error(out: &CtlOutput, keyword: &str) {
    assert!(!out.success(), "`{}` should have failed; stdout: {}", out.command, out.stdout);
    let stderr = out.stderr.trim();
    assert!(stderr.starts_with("error:"), "`{}`: stderr should start with `error:`: {stderr:?}", out.command);
    assert_eq!(stderr.lines().count(), 1, "`{}`: a one-line error expected: {stderr:?}", out.command);
    assert!(stderr.contains(keyword), "`{}`: the error should say {keyword:?}: {stderr:?}", out.command);
}

/// Asserts none of `outputs` (stdout and stderr) and none of the files at `logs` contains `secret`.
#[track_caller]
fn assert_secret_nowhere(secret: &str, outputs: &[&CtlOutput], logs: &[&Path]) {
    for out in outputs {
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "`{}` printed the secret: stdout {:?}, stderr {:?}",
            out.command,
            out.stdout,
            out.stderr
        );
    }
    for log in logs {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
        assert!(lines.is_empty(), "{} holds the secret:\n{}", log.display(), lines.join("\n"));
    }
}

/// The SHA-256 of `bytes`, in hex as the backup specs carry it.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Takes a manual backup of [`CLUSTER`] and waits until it is final; returns the status spec.
async fn backup_and_wait(coordinator: &Coordinator) -> anyhow::Result<Value> {
    coordinator.manual_backup(CLUSTER).await?;
    coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await
}

/// The one listed backup of [`CLUSTER`]: its id and spec.
async fn only_backup(coordinator: &Coordinator) -> anyhow::Result<(String, Value)> {
    let backups = coordinator.backups(CLUSTER).await?;
    anyhow::ensure!(backups.len() == 1, "exactly one backup of {CLUSTER} expected: {backups:#?}");
    let id = backups[0]["metadata"]["id"].as_str().context("backup metadata.id")?.to_owned();
    Ok((id, backups[0]["spec"].clone()))
}

/// Fetches the backup's object with `aws`, checks its size and digest against `spec`, decompresses it with
/// `zstd` and returns the path of the plain snapshot.
async fn fetch_with_aws(s3: &S3Server, dir: &Path, spec: &Value) -> anyhow::Result<std::path::PathBuf> {
    let key = spec["snapshot"].as_str().context("backup spec.snapshot")?;
    let object = dir.join("aws.snapshot.zst");
    s3.aws()?.download(TEST_BUCKET, key, &object).await?;
    let object_bytes = std::fs::read(&object)?;
    assert_eq!(spec["size"].as_u64(), Some(object_bytes.len() as u64), "spec.size is the S3 object's size");
    assert_eq!(spec["sha256"].as_str(), Some(sha256_hex(&object_bytes).as_str()), "spec.sha256 is the object's");
    let snapshot = dir.join("aws.snapshot");
    zstd_decompress(&object, &snapshot).await?;
    let snapshot_bytes = std::fs::read(&snapshot)?;
    assert_eq!(spec["rawsize"].as_u64(), Some(snapshot_bytes.len() as u64), "spec.rawsize is the snapshot's size");
    assert_eq!(
        spec["rawsha256"].as_str(),
        Some(sha256_hex(&snapshot_bytes).as_str()),
        "spec.rawsha256 is the decompressed snapshot's"
    );
    Ok(snapshot)
}

/// Waits until `s3` holds no unfinished multipart upload (aborts may land a moment after a status).
async fn wait_no_leftover_uploads(s3: &S3Server, timeout: Duration) -> anyhow::Result<()> {
    poll_until("no unfinished multipart upload in s3s-fs", timeout, Duration::from_millis(250), || async {
        let leftovers = s3.leftover_uploads();
        if leftovers.is_empty() {
            Ok(Some(()))
        } else {
            anyhow::bail!("left: {leftovers:?}")
        }
    })
    .await
}

/// `ferry_store_verify_read_bytes_total` of the coordinator whose metrics listen on `port`: the bytes it read
/// back from S3 to verify uploads.
fn verify_read_bytes(port: u16) -> anyhow::Result<u64> {
    let (_, body) = crate::observe::http_get(port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("ferry_store_verify_read_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .with_context(|| format!("no ferry_store_verify_read_bytes_total in:\n{body}"))
}

/// Backup `id`'s manifest as stored in the bucket, read with `aws`.
async fn stored_manifest(s3: &S3Server, dir: &Path, id: &str) -> anyhow::Result<Value> {
    let path = dir.join(format!("{id}.manifest.json"));
    s3.aws()?.download(TEST_BUCKET, &format!("{S3_KEY_PREFIX}/{CLUSTER}/{id}.manifest.json"), &path).await?;
    Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
}

/// A coordinator on `s3` with its metrics on a port of its own, started with `args` too; and that port.
async fn coordinator_with_metrics(s3: &S3Server, args: &[&str]) -> anyhow::Result<(Coordinator, u16)> {
    let port = ports::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut all = vec!["--metrics-listen", metrics.as_str()];
    all.extend_from_slice(args);
    Ok((Coordinator::start_s3(s3, CoordinatorOptions::s3(&all)).await?, port))
}

/// Only the keys under `prefix` of a key/value map.
fn under<V: Clone>(kvs: &HashMap<String, V>, prefix: &str) -> HashMap<String, V> {
    kvs.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[tokio::test]
async fn s3_config_errors_are_each_named_and_keep_the_old_config() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let coordinator = Coordinator::start(CoordinatorOptions::s3(&[])).await?;
    let ctl = coordinator.ctl();
    let mut outputs = Vec::new();

    let status = overall_status(&coordinator).await?;
    assert_eq!(status["configurationname"], "s3", "{status:#}");
    assert_eq!(status["configurationerror"], "not initialized", "{status:#}");
    assert_eq!(status["configurationattempt"], 0, "{status:#}");

    // Each way to get it wrong is named. None of them stores anything.
    let wrong_secret = "wrong-secret-Hh3kLp0q";
    let unreachable = format!("http://127.0.0.1:{}", ports::free_port());
    let bad_configs = [
        ("wrong secret", S3Config { secret_access_key: wrong_secret.to_owned(), ..s3.config() }, "secretaccesskey"),
        ("missing bucket", S3Config { bucket: "nobucket".to_owned(), ..s3.config() }, "does not exist"),
        ("unreachable endpoint", S3Config { endpoint: unreachable.clone(), ..s3.config() }, "unreachable"),
    ];
    let mut attempts = 0;
    for (what, config, keyword) in &bad_configs {
        let out = ctl.apply_yaml(&config.to_yaml()).await?;
        attempts += 1;
        assert_one_line_error(&out, keyword);
        let status = overall_status(&coordinator).await?;
        assert_eq!(status["configurationattempt"], attempts, "after the {what} attempt: {status:#}");
        assert_ne!(status["configurationerror"], "", "still unusable after the {what} attempt: {status:#}");
        let stored = ctl.run(&["get", S3_CONFIG_TYPE, S3_CONFIG_ID, "-o", "json"]).await?;
        assert!(!stored.success(), "a rejected first config ({what}) must not be stored: {}", stored.stdout);
        outputs.push(out);
        outputs.push(stored);
    }

    let out = ctl.apply_yaml(&s3.config().to_yaml()).await?.ok()?;
    attempts += 1;
    outputs.push(out);
    let status = overall_status(&coordinator).await?;
    assert_eq!(status["configurationerror"], "", "usable after a good config: {status:#}");
    assert_eq!(status["configurationattempt"], attempts, "{status:#}");
    let good = ctl.get_json(S3_CONFIG_TYPE, Some(S3_CONFIG_ID)).await?["spec"].clone();
    assert_eq!(good["bucket"], TEST_BUCKET, "{good:#}");
    assert_eq!(good["endpoint"], s3.endpoint(), "{good:#}");
    assert_eq!(good["secretaccesskey"], "***", "the secret is redacted: {good:#}");

    // A bad config after a good one changes nothing, and the store stays usable.
    for (what, config, keyword) in &bad_configs {
        let out = ctl.apply_yaml(&config.to_yaml()).await?;
        attempts += 1;
        assert_one_line_error(&out, keyword);
        let status = overall_status(&coordinator).await?;
        assert_eq!(status["configurationattempt"], attempts, "after the second {what} attempt: {status:#}");
        assert_eq!(status["configurationerror"], "", "a rejected {what} leaves the store usable: {status:#}");
        let stored = ctl.run(&["get", S3_CONFIG_TYPE, S3_CONFIG_ID, "-o", "json"]).await?.ok()?;
        let spec = stored.json()?["spec"].clone();
        assert_eq!(spec, good, "a rejected {what} left the stored config unchanged");
        outputs.push(out);
        outputs.push(stored);
    }

    // `***` keeps the stored secret: the listing that validates the new prefix signs with it.
    let keep_secret = S3Config { secret_access_key: "***".to_owned(), prefix: "elsewhere".to_owned(), ..s3.config() };
    outputs.push(ctl.apply_yaml(&keep_secret.to_yaml()).await?.ok().context("re-apply with secret ***")?);
    attempts += 1;
    let status = overall_status(&coordinator).await?;
    assert_eq!(status["configurationattempt"], attempts, "{status:#}");
    assert_eq!(status["configurationerror"], "", "{status:#}");
    let kept = ctl.get_json(S3_CONFIG_TYPE, Some(S3_CONFIG_ID)).await?["spec"].clone();
    assert_eq!(kept["prefix"], "elsewhere", "{kept:#}");
    assert_eq!(kept["secretaccesskey"], "***", "{kept:#}");

    // `***` never takes the stored secret to another endpoint, bucket or key id (issue 26): it would be sent to
    // whoever answers there. Refused before any request, the stored config unchanged.
    let redacted = || S3Config { secret_access_key: "***".to_owned(), ..s3.config() };
    let moves = [
        ("endpoint", S3Config { endpoint: "http://127.0.0.1:9".to_owned(), ..redacted() }),
        ("bucket", S3Config { bucket: "another-bucket".to_owned(), ..redacted() }),
        ("accesskeyid", S3Config { access_key_id: "ANOTHERKEYID".to_owned(), ..redacted() }),
    ];
    for (field, moved) in moves {
        let out = ctl.apply_yaml(&moved.to_yaml()).await?;
        assert_one_line_error(&out, field);
        assert_one_line_error(&out, "in full instead of ***");
        outputs.push(out);
    }
    assert_eq!(ctl.get_json(S3_CONFIG_TYPE, Some(S3_CONFIG_ID)).await?["spec"], kept, "the stored config changed");

    for format in ["json", "yaml"] {
        outputs.push(ctl.run(&["get", S3_CONFIG_TYPE, "-o", format]).await?.ok()?);
    }
    outputs.push(ctl.run(&["get", S3_CONFIG_TYPE]).await?.ok()?);
    let outputs: Vec<&CtlOutput> = outputs.iter().collect();
    for secret in [TEST_SECRET_KEY, wrong_secret] {
        assert_secret_nowhere(secret, &outputs, &[coordinator.log_path()]);
    }
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn s3_manual_backup_is_refused_until_the_store_is_configured() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::s3(&[])).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let out = coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?;
    assert_one_line_error(&out, "not usable");
    assert!(s3.leftover_uploads().is_empty(), "nothing was uploaded: {:?}", s3.leftover_uploads());

    coordinator.ctl().apply_yaml(&s3.config().to_yaml()).await?.ok()?;
    let status = backup_and_wait(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "a backup once configured: {status:#}");
    Ok(())
}

#[tokio::test]
async fn s3_backup_restores_with_independent_tools() -> anyhow::Result<()> {
    const KEYS: usize = 3000;
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(KEYS).await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let status = backup_and_wait(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status:#}");
    let (id, spec) = only_backup(&coordinator).await?;
    let object_key = format!("{S3_KEY_PREFIX}/{CLUSTER}/{id}.snapshot.zst");
    let manifest_key = format!("{S3_KEY_PREFIX}/{CLUSTER}/{id}.manifest.json");
    assert_eq!(spec["snapshot"], object_key, "spec.snapshot is the object key: {spec:#}");

    // What S3 holds, seen by a client that is not Ferry: the object and its manifest beside it.
    let keys = s3.aws()?.list_keys(TEST_BUCKET, &format!("{S3_KEY_PREFIX}/")).await?;
    assert_eq!(keys, vec![manifest_key, object_key], "the bucket holds the object and its manifest");

    let snapshot = fetch_with_aws(&s3, coordinator.dir(), &spec).await?;
    let via_ferryctl = coordinator.dir().join("ferryctl.snapshot");
    coordinator.download_backup(CLUSTER, &id, &via_ferryctl, true).await?;
    assert!(
        std::fs::read(&via_ferryctl)? == std::fs::read(&snapshot)?,
        "`ferryctl backup download --decompress` differs from `aws s3 cp` + `zstd -d`"
    );

    let restored = restore_and_read(&snapshot).await?;
    assert_same_kvs(&expected_test_kvs(KEYS), &under(&restored, TEST_PREFIX), "keys restored from the S3 object");
    assert_same_kvs(&etcd.read_prefix("").await?, &restored, "whole keyspace: live cluster vs restored backup");

    assert!(s3.leftover_uploads().is_empty(), "unfinished uploads: {:?}", s3.leftover_uploads());
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn s3_backup_over_several_parts() -> anyhow::Result<()> {
    const PART_MIB: usize = 5;
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(18 * MIB, 1).await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&["--upload-part-size-mib", "5"])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let status = backup_and_wait(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status:#}");
    let (_, spec) = only_backup(&coordinator).await?;
    let size = spec["size"].as_u64().context("backup spec.size")?;
    assert!(size > (3 * PART_MIB * MIB) as u64, "random data should not compress below 3 parts: {size} bytes");

    // A multipart object's ETag ends in `-<number of parts>`.
    let key = spec["snapshot"].as_str().context("backup spec.snapshot")?;
    let head = s3.aws()?.head(TEST_BUCKET, key).await?;
    let etag = head["ETag"].as_str().context("head-object ETag")?.trim_matches('"').to_owned();
    let parts: usize = etag.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).unwrap_or(1);
    let expected_parts = (size as usize).div_ceil(PART_MIB * MIB);
    assert_eq!(parts, expected_parts, "uploaded in {PART_MIB} MiB parts (ETag {etag}, {size} bytes)");

    let snapshot = fetch_with_aws(&s3, coordinator.dir(), &spec).await?;
    let restored = restore_and_read_raw(&snapshot).await?;
    assert_same_kvs(&written, &under(&restored, TEST_PREFIX), "random values restored from the S3 object");

    assert!(s3.leftover_uploads().is_empty(), "unfinished uploads: {:?}", s3.leftover_uploads());
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn s3_server_stopped_mid_upload_leaves_no_parts_and_next_backup_succeeds() -> anyhow::Result<()> {
    let mut s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(20 * MIB, 2).await?;
    // 8 Mbit/s is 1 MB/s: the upload takes about 20 s, plenty of time to pull the plug in the middle. The
    // smallest parts make the agent hit the outage sooner (it sends a part once it is full).
    let options = CoordinatorOptions::s3(&["--upload-limit-mbps", "8", "--upload-part-size-mib", "5"]);
    let coordinator = Coordinator::start_s3(&s3, options).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let first_at = unix_now();
    coordinator.manual_backup(CLUSTER).await?;
    coordinator.wait_backup_running(CLUSTER, Duration::from_secs(30)).await?;
    poll_until("the multipart upload to begin in s3s-fs", Duration::from_secs(30), Duration::from_millis(100), || {
        let started = !s3.leftover_uploads().is_empty();
        async move { Ok(started.then_some(())) }
    })
    .await?;
    s3.stop();

    let failed = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(90)).await?;
    assert_eq!(failed["status"], STATUS_ERROR, "the backup should fail while S3 is down: {failed:#}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "a failed backup says why: {failed:#}");

    // Backups are listed from S3, so the listing waits for the server to be back.
    s3.start_again().await?;
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "a failed backup must not be listed");
    // Manual backups are keyed by their second.
    while unix_now() <= first_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_next_backup_status(CLUSTER, &failed, Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "the backup after the outage failed: {status:#}");

    // The coordinator aborts the broken upload before the next backup: no part of it is left.
    wait_no_leftover_uploads(&s3, Duration::from_secs(10)).await?;
    let (id, spec) = only_backup(&coordinator).await?;
    let keys = s3.aws()?.list_keys(TEST_BUCKET, "").await?;
    assert_eq!(
        keys,
        vec![
            format!("{S3_KEY_PREFIX}/{CLUSTER}/{id}.manifest.json"),
            format!("{S3_KEY_PREFIX}/{CLUSTER}/{id}.snapshot.zst")
        ],
        "only the good backup is in the bucket"
    );
    let snapshot = fetch_with_aws(&s3, coordinator.dir(), &spec).await?;
    let restored = restore_and_read_raw(&snapshot).await?;
    assert_same_kvs(&written, &under(&restored, TEST_PREFIX), "random values restored after the outage");

    // The outage is logged as WARN (retries, the failed backup, the abort left for later): no ERROR.
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn s3_secrets_appear_in_no_log() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(500).await?;
    let options = CoordinatorOptions::s3(&[]).with_env("RUST_LOG", "debug");
    let coordinator = Coordinator::start_s3(&s3, options).await?;
    let agents = coordinator.start_agents_with_env(CLUSTER, &etcd, &[("RUST_LOG", "debug")]).await?;
    let ctl = coordinator.ctl();

    let status = backup_and_wait(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status:#}");
    let (id, _) = only_backup(&coordinator).await?;
    let download = coordinator.dir().join("download.snapshot");
    let download_str = download.display().to_string();
    let mut outputs = vec![
        ctl.run(&["backup", "download", CLUSTER, &id, "-o", &download_str, "--decompress"]).await?.ok()?,
        ctl.apply_yaml(&s3.config().to_yaml()).await?.ok()?,
        ctl.apply_yaml(&S3Config { secret_access_key: "***".to_owned(), ..s3.config() }.to_yaml()).await?.ok()?,
    ];
    for ty in [S3_CONFIG_TYPE, OVERALL_STATUS.0, "etcdbackup", "etcdbackupstatus"] {
        for format in ["json", "yaml", "table"] {
            let mut args = vec!["get", ty];
            if format != "table" {
                args.extend(["-o", format]);
            }
            outputs.push(ctl.run(&args).await?.ok()?);
        }
    }

    let debug_lines =
        std::fs::read_to_string(coordinator.log_path())?.lines().filter(|l| l.contains(" DEBUG ")).count();
    assert!(debug_lines > 0, "the coordinator should log at debug level for this test to mean something");
    let mut logs = vec![coordinator.log_path()];
    logs.extend(agents.iter().map(|a| a.log_path()));
    let outputs: Vec<&CtlOutput> = outputs.iter().collect();
    assert_secret_nowhere(TEST_SECRET_KEY, &outputs, &logs);
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn s3_status_shows_running_with_bytes_done() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_random_values(6 * MIB, 3).await?;
    // 8 Mbit/s is 1 MB/s: about 6 s of upload to watch.
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&["--upload-limit-mbps", "8"])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    coordinator.manual_backup(CLUSTER).await?;
    let running = coordinator.wait_backup_running(CLUSTER, Duration::from_secs(30)).await?;
    assert_eq!(running["status"], STATUS_RUNNING);
    let status = coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status:#}");
    let (_, spec) = only_backup(&coordinator).await?;
    let bytes_done = running["bytesdone"].as_u64().context("spec.bytesdone")?;
    let raw_size = spec["rawsize"].as_u64().context("backup spec.rawsize")?;
    assert!(bytes_done <= raw_size, "bytesdone {bytes_done} counts raw bytes, at most the snapshot's {raw_size}");

    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

/// Issue 29: by default (`--verify-upload parts`) the coordinator proves an upload without downloading it —
/// the stored parts are the announced ones, the completed object's size and multipart ETag are theirs, its
/// first bytes are a zstd frame — so it reads at most 1 % of the object
/// (`ferry_store_verify_read_bytes_total`). The manifest and the `EtcdBackups` resource say how it was
/// verified, and the backup restores with etcd's own tools and through `ferryctl`, which check every hash.
#[tokio::test]
async fn s3_uploads_are_verified_by_their_parts_reading_at_most_one_percent() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(12 * MIB, 5).await?;
    let (coordinator, metrics_port) = coordinator_with_metrics(&s3, &["--upload-part-size-mib", "5"]).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    assert_eq!(verify_read_bytes(metrics_port)?, 0, "nothing read before a backup");

    let status = backup_and_wait(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status:#}");
    let (id, spec) = only_backup(&coordinator).await?;
    let size = spec["size"].as_u64().context("backup spec.size")?;
    assert!(size > (2 * 5 * MIB) as u64, "several parts: {size} bytes");
    let read = verify_read_bytes(metrics_port)?;
    assert!(read > 0 && read * 100 <= size, "the coordinator read {read} of {size} bytes back: more than 1 %");
    assert_eq!(stored_manifest(&s3, coordinator.dir(), &id).await?["verification"], "parts");
    let listed = &coordinator.backups(CLUSTER).await?[0];
    assert_eq!(listed["metadata"]["annotations"]["ferry.dev/verification"], "parts", "{listed:#}");

    // What was stored is exactly what the agent sent, and restores with etcd's own tools.
    let snapshot = fetch_with_aws(&s3, coordinator.dir(), &spec).await?;
    let restored = restore_and_read_raw(&snapshot).await?;
    assert_same_kvs(&written, &under(&restored, TEST_PREFIX), "random values restored from the S3 object");
    let via_ferryctl = coordinator.dir().join("ferryctl.snapshot");
    coordinator.download_backup(CLUSTER, &id, &via_ferryctl, true).await?;
    assert!(std::fs::read(&via_ferryctl)? == std::fs::read(&snapshot)?, "ferryctl's download differs");

    assert!(s3.leftover_uploads().is_empty(), "unfinished uploads: {:?}", s3.leftover_uploads());
    assert_daemon_logs_clean(&coordinator, &agents);
    eprintln!("VERIFY parts: read {read} of {size} bytes back ({:.3} %)", read as f64 * 100.0 / size as f64);
    Ok(())
}

/// `--verify-upload full` reads every uploaded object back through every restore check, as before issue
/// 29: every byte of it is counted, and the manifest says `full`.
#[tokio::test]
async fn s3_verify_upload_full_reads_the_whole_object_back() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(500).await?;
    let (coordinator, metrics_port) = coordinator_with_metrics(&s3, &["--verify-upload", "full"]).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let status = backup_and_wait(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "backup failed: {status:#}");
    let (id, spec) = only_backup(&coordinator).await?;
    let size = spec["size"].as_u64().context("backup spec.size")?;
    assert_eq!(verify_read_bytes(metrics_port)?, size, "the whole object is read back");
    assert_eq!(stored_manifest(&s3, coordinator.dir(), &id).await?["verification"], "full");
    let snapshot = fetch_with_aws(&s3, coordinator.dir(), &spec).await?;
    restore_and_read(&snapshot).await?;
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}
