//! Issue 29 against a store that checks what S3 checks: `ministack` ([`Ministack`]) refuses a part whose
//! body does not match the `Content-MD5` and `x-amz-checksum-sha256` its presigned URL was signed with, which
//! s3s-fs (the other test server) does not. So here a part changed on its way, or sent by a lying agent, is
//! refused by the store itself, before the coordinator's own comparison of the parts.
//!
//! The tests skip when `.tools/ministack` is missing (`tests/setup.sh` installs it), except under `CI`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use ferry_common::presigned::PresignedClient;
use ferry_common::protocol::{expect_frame, write_frame, BackupSummary, JobMsg, JobReply, PartDigest, UploadedPart};
use ferry_common::resources::Timestamp;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::faults_s3::{backup_once, part_number};
use crate::fixtures::ferry::{CoordinatorOptions, STATUS_ERROR};
use crate::fixtures::hostile::HostileAgent;
use crate::fixtures::ministack::Ministack;
use crate::fixtures::s3::{S3Config, S3Endpoint as _};
use crate::fixtures::s3_faults::{Answer, FaultProxy, Faults, Request, Rule, When};
use crate::fixtures::{
    assert_daemon_logs_clean, assert_same_kvs, poll_until, restore_and_read_raw, zstd_decompress, Coordinator,
    EtcdCluster, STATUS_OK, TEST_PREFIX,
};
use crate::least_privilege::sane_facts;

/// The cluster [`backup_once`] backs up.
const CLUSTER: &str = "prod";
const MIB: usize = 1024 * 1024;
const WAIT: Duration = Duration::from_secs(60);

/// The headers a presigned URL (or its query) lists as signed, lowercase.
fn signed_headers(url_or_query: &str) -> Vec<String> {
    let query = url_or_query.split_once('?').map_or(url_or_query, |(_, q)| q);
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("X-Amz-SignedHeaders="))
        .map(|v| v.replace("%3B", ";").replace("%3b", ";").split(';').map(str::to_ascii_lowercase).collect())
        .unwrap_or_default()
}

/// Fails unless a part URL binds its length and both checksums: what a checking store compares the body with.
#[track_caller]
fn assert_signed_for_the_bytes(url_or_query: &str) {
    let signed = signed_headers(url_or_query);
    for header in ["content-length", "content-md5", "x-amz-checksum-sha256"] {
        assert!(signed.iter().any(|h| h == header), "a part URL signed without {header}: {signed:?}");
    }
}

/// Waits until ministack holds no unfinished multipart upload (an abort may land just after the status).
async fn wait_no_uploads(s3: &Ministack) -> anyhow::Result<()> {
    poll_until("no unfinished multipart upload in ministack", WAIT, Duration::from_millis(250), || async {
        let left = s3.uploads().await?;
        if left.is_empty() {
            Ok(Some(()))
        } else {
            anyhow::bail!("left: {left:?}")
        }
    })
    .await
}

/// The one listed backup of [`CLUSTER`] is in ministack, object and manifest and nothing else, with no
/// upload left; its manifest says it was verified by its parts, and its object, fetched from ministack (not
/// through Ferry), restores with etcd's own tools to `written`.
async fn assert_only_backup_restores(
    s3: &Ministack,
    coordinator: &Coordinator,
    written: &HashMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    let listed = coordinator.backups(CLUSTER).await?;
    anyhow::ensure!(listed.len() == 1, "exactly one backup expected: {listed:#?}");
    assert_eq!(listed[0]["metadata"]["annotations"]["ferry.dev/verification"], "parts", "{:#}", listed[0]);
    let spec = &listed[0]["spec"];
    let object_key = spec["snapshot"].as_str().context("spec.snapshot")?.to_owned();
    let manifest_key = object_key.replace(".snapshot.zst", ".manifest.json");
    let mut expected = vec![object_key.clone(), manifest_key.clone()];
    expected.sort();
    assert_eq!(s3.keys("").await?, expected, "the bucket holds the backup and its manifest only");
    wait_no_uploads(s3).await?;
    let manifest: Value = serde_json::from_slice(&s3.get(&manifest_key).await?)?;
    assert_eq!(manifest["verification"], "parts", "the manifest says how it was proven: {manifest:#}");

    let object = s3.get(&object_key).await?;
    assert_eq!(spec["size"].as_u64(), Some(object.len() as u64), "spec.size is the stored object's");
    assert_eq!(spec["sha256"].as_str(), Some(hex::encode(Sha256::digest(&object)).as_str()), "spec.sha256");
    // Random values do not compress: several 5 MiB parts, each checked by the store as it arrived.
    assert!(object.len() > 2 * 5 * MIB, "several parts: {} bytes", object.len());
    let compressed = coordinator.dir().join("ministack.snapshot.zst");
    let snapshot = coordinator.dir().join("ministack.snapshot");
    std::fs::write(&compressed, &object)?;
    zstd_decompress(&compressed, &snapshot).await?;
    let restored: HashMap<String, Vec<u8>> =
        restore_and_read_raw(&snapshot).await?.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
    assert_same_kvs(written, &restored, "the backup stored in ministack restores");
    std::fs::remove_file(&compressed)?;
    std::fs::remove_file(&snapshot)?;
    Ok(())
}

/// A real agent backs a real etcd up to ministack with the defaults (5 MiB parts, `--verify-upload parts`):
/// the SDK's presigned part URLs carry `Content-MD5` and `x-amz-checksum-sha256` as signed headers, the
/// store checks each part against them and accepts it, the coordinator proves the upload by its parts, and
/// the object restores with etcd's own tools.
#[tokio::test]
async fn a_backup_to_a_store_that_checks_part_checksums_is_proven_by_its_parts_and_restores() -> anyhow::Result<()> {
    let Some(s3) = Ministack::start_or_skip().await? else { return Ok(()) };
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(12 * MIB, 29).await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let (status, took) = backup_once(&coordinator).await?;
    assert_eq!(status["status"], STATUS_OK, "backup to ministack failed: {status:#}");
    assert_only_backup_restores(&s3, &coordinator, &written).await?;
    assert_daemon_logs_clean(&coordinator, &agents);
    eprintln!("MINISTACK backup of 12 MiB with the defaults: ok in {took:?}, verified by its parts");
    Ok(())
}

/// Issue 29's proof: one byte of part 2 flipped on its way (the fault proxy), its signed headers kept. The
/// store itself refuses it (`400 BadDigest`, relayed by the agent), it is not retried, the backup fails
/// cleanly — nothing listed, no object, no manifest, no multipart upload left in the store — and the next
/// backup succeeds.
#[tokio::test]
async fn a_part_changed_on_its_way_is_refused_by_the_store_itself_and_nothing_is_kept() -> anyhow::Result<()> {
    let Some(s3) = Ministack::start_or_skip().await? else { return Ok(()) };
    let proxy = FaultProxy::start(s3.port()).await?;
    let etcd = EtcdCluster::start(1).await?;
    let written = etcd.put_random_values(12 * MIB, 7).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::s3(&[])).await?;
    let config = S3Config { endpoint: proxy.endpoint(), ..s3.s3_config() };
    coordinator.ctl().apply_yaml(&config.to_yaml()).await?.ok().context("apply the S3 config")?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;

    let tamper = Rule::new(|r: &Request| part_number(r) == Some(2), When::First(1), Answer::Tamper);
    proxy.set(Faults { rules: vec![tamper.clone()], ..Faults::default() });
    let (failed, failed_after) = backup_once(&coordinator).await?;
    assert_eq!(failed["status"], STATUS_ERROR, "the backup should have failed: {failed:#}");
    assert_eq!(tamper.hits(), 1, "part 2 went through the proxy changed");
    let error = failed["error"].as_str().unwrap_or_default().to_owned();
    // Only the store can have said so: the proxy forwarded the request and passed its answer back as it was.
    assert!(
        error.contains("upload part 2") && error.contains("HTTP 400 BadDigest"),
        "the status names the store's refusal of part 2: {error}"
    );
    let parts: Vec<Request> = proxy.seen().into_iter().map(|s| s.request).filter(Request::is_upload_part).collect();
    assert_eq!(parts.iter().filter(|r| part_number(r) == Some(2)).count(), 1, "a refused digest is not retried");
    for part in &parts {
        assert_signed_for_the_bytes(&part.query);
    }
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "nothing listed");
    wait_no_uploads(&s3).await?;
    assert_eq!(s3.keys("").await?, Vec::<String>::new(), "no object, no manifest");

    proxy.set(Faults::default());
    let (ok, next) = backup_once(&coordinator).await?;
    assert_eq!(ok["status"], STATUS_OK, "the next backup: {ok:#}");
    assert_only_backup_restores(&s3, &coordinator, &written).await?;
    assert_daemon_logs_clean(&coordinator, &agents);
    eprintln!(
        "FAULT s3-part-tampered (ministack): one byte of part 2 flipped in flight -> failed after {failed_after:?}: \
         {error}; next backup ok in {next:?}"
    );
    Ok(())
}

/// A hostile agent sends other bytes than it announced through the real presigned URL of its part (the same
/// length, so the signed length holds): the store refuses them (`400 BadDigest`), and when the agent claims
/// the backup is done anyway, nothing is recorded.
#[tokio::test]
async fn other_bytes_than_a_part_url_was_signed_for_are_refused_by_the_store() -> anyhow::Result<()> {
    let Some(s3) = Ministack::start_or_skip().await? else { return Ok(()) };
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], WAIT).await?;
    // As in least_privilege: its report is taken in before the backup is asked for.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Announced: a zstd-compressed "snapshot" with its hashes right. Sent: one byte of it flipped.
    let raw = {
        let mut junk: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let hash = Sha256::digest(&junk);
        junk.extend_from_slice(&hash);
        junk
    };
    let announced = zstd::encode_all(&raw[..], 3)?;
    let mut sent = announced.clone();
    let middle = sent.len() / 2;
    sent[middle] ^= 0xff;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(WAIT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let request = job.part_url(1, &announced).await?;
    assert_signed_for_the_bytes(&request.url);
    let refused = PresignedClient::new("")?.send(&request, Bytes::from(sent), "upload part 1").await;
    let refusal = match refused {
        Err(e) => e.to_string(),
        Ok(r) => anyhow::bail!("the store took other bytes than the URL was signed for: HTTP {}", r.status),
    };
    assert!(refusal.contains("HTTP 400 BadDigest"), "the store's refusal: {refusal}");

    // It claims the announced bytes were stored.
    let lie = format!("\"{}\"", hex::encode(PartDigest::of(&announced).md5));
    let summary = BackupSummary {
        raw_size: raw.len() as u64,
        raw_sha256: Sha256::digest(&raw).into(),
        compressed_size: announced.len() as u64,
        compressed_sha256: Sha256::digest(&announced).into(),
        zstd_level: 3,
        started_at: Timestamp::now(),
        finished_at: Timestamp::now(),
        parts: vec![UploadedPart { number: 1, etag: lie }],
        sealed: None,
    };
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    let reply: JobReply = expect_frame(&mut job.recv).await?;
    anyhow::ensure!(matches!(reply, JobReply::Failed { .. }), "a part the store refused was committed: {reply:?}");
    let status = coordinator.wait_backup_status("evil", WAIT).await?;
    assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
    assert!(coordinator.backups("evil").await?.is_empty(), "something was recorded for evil");
    wait_no_uploads(&s3).await?;
    assert_eq!(s3.keys("").await?, Vec::<String>::new(), "no object, no manifest");
    evil.close().await;
    Ok(())
}
