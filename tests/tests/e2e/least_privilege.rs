//! Least privilege, played by an attacker holding one node: a hostile agent with a real agent certificate
//! (`fixtures::hostile`) takes what the coordinator hands it and tries to reach further with it.
//!
//! - S3: nothing an agent receives in a backup or a restore (presigned requests) lists, reads, writes or
//!   deletes any other object, and no S3 secret is in it.
//! - What an agent says: a lying member is not chosen, junk with a correct trailing hash is not committed,
//!   backups are dated by the coordinator's clock, and progress messages without bytes do not hold a job.
//! - Bounded requests: a download the client stops reading is dropped after the progress timeout.
//! - Files and names: backup data and secrets are private, and names that would leave the store are refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use ferry_common::client::Session;
use ferry_common::config::AgentCredentials;
use ferry_common::presigned::PresignedClient;
use ferry_common::protocol::{
    expect_frame, read_frame, write_frame, AdminRequest, AdminResponse, BackupSummary, BackupTarget, EtcdFacts, JobMsg,
    JobReply, JobRequest, PartDigest, PresignedRequest, RestoreSource, UploadedPart,
};
use ferry_common::resources::Timestamp;
use ferry_common::s3::S3ErrorKind;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::fixtures::ferry::{CoordinatorOptions, STATUS_ERROR};
use crate::fixtures::hostile::{agent_request, etcd_snapshot, HostileAgent};
use crate::fixtures::s3::{TEST_ACCESS_KEY, TEST_SECRET_KEY};
use crate::fixtures::{poll_until, test_dir, unix_now, Coordinator, EtcdCluster, S3Server, STATUS_OK, TEST_BUCKET};

const BACKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What an ordinary member reports (for hostile agents that otherwise look sane).
pub(crate) fn sane_facts(member_id: u64) -> EtcdFacts {
    EtcdFacts {
        member_id,
        cluster_id: 7,
        etcd_version: "3.5.16".into(),
        db_size: 1 << 20,
        raft_applied_index: 100,
        revision: 1,
        leader: true,
        leader_id: member_id,
        error: None,
        hashed_compactions: Vec::new(),
    }
}

/// Backs `cluster` up and waits for a good status.
async fn backup_ok(coordinator: &Coordinator, cluster: &str) -> anyhow::Result<Value> {
    coordinator.manual_backup(cluster).await?;
    let status = coordinator.wait_backup_status(cluster, BACKUP_TIMEOUT).await?;
    anyhow::ensure!(status["status"] == STATUS_OK, "backup of {cluster} failed: {status:#}");
    Ok(status)
}

/// `req` with its method and path replaced, its signature (query) kept: the attacker's only material.
fn retarget(req: &PresignedRequest, origin: &str, method: &str, path_and_extra_query: &str) -> PresignedRequest {
    let query = req.url.split_once('?').map_or("", |(_, q)| q);
    let sep = if path_and_extra_query.contains('?') { "&" } else { "?" };
    PresignedRequest {
        method: method.into(),
        url: format!("{origin}/{path_and_extra_query}{sep}{query}"),
        headers: req.headers.clone(),
        expires_at: req.expires_at,
    }
}

/// Every attempt must be refused by S3 as not signed for it.
async fn assert_all_refused(http: &PresignedClient, attempts: &[(&str, PresignedRequest)]) {
    for (what, req) in attempts {
        let r = http.send(req, Bytes::from_static(b"planted"), what).await;
        match r {
            Err(e) if matches!(e.kind, S3ErrorKind::AccessDenied | S3ErrorKind::BadSignature) => {}
            Err(e) => panic!("{what}: refused, but not as unauthorised: {e}"),
            Ok(r) => panic!("{what}: S3 accepted it (HTTP {})", r.status),
        }
    }
}

/// sha256 of every object in the bucket, by key (what an attacker would want to change).
async fn bucket_digest(s3: &S3Server) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in crate::fixtures::files_under(&s3.root().join(TEST_BUCKET))? {
        let key = entry.strip_prefix(s3.root().join(TEST_BUCKET))?.display().to_string();
        out.push((key, hex::encode(Sha256::digest(std::fs::read(&entry)?))));
    }
    out.sort();
    Ok(out)
}

#[tokio::test]
async fn s3_presigned_requests_an_agent_gets_reach_no_other_object() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&["--upload-part-size-mib", "5"])).await?;
    let _alpha = coordinator.start_agents("alpha", &etcd).await?;
    let _beta = coordinator.start_agents("beta", &etcd).await?;
    backup_ok(&coordinator, "alpha").await?;
    backup_ok(&coordinator, "beta").await?;
    let alpha = coordinator.backups("alpha").await?[0]["spec"].clone();
    let alpha_object = alpha["snapshot"].as_str().context("alpha's snapshot key")?.to_owned();
    let alpha_manifest = alpha_object.replace(".snapshot.zst", ".manifest.json");
    let before = bucket_digest(&s3).await?;
    let origin = s3.endpoint();
    let http = PresignedClient::new("")?;

    // A backup: a stolen node of cluster "evil" takes the job and keeps what it gets.
    let evil_creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &evil_creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    let mut received = serde_json::to_string(&job.request)?;
    let JobRequest::Backup(b) = &job.request else { anyhow::bail!("a backup job expected: {:?}", job.request) };
    let BackupTarget::S3(upload) = &b.target else { anyhow::bail!("an S3 job expected: {:?}", job.request) };
    let own_key = upload.key.clone();
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let own_part = Bytes::from(vec![7u8; 1024]);
    write_frame(&mut job.send, &JobMsg::PartUrl { number: 1, digest: PartDigest::of(&own_part) }).await?;
    let reply: JobReply = expect_frame(&mut job.recv).await?;
    received.push_str(&serde_json::to_string(&reply)?);
    let JobReply::PartUrl { request: part, .. } = reply else { anyhow::bail!("a part URL expected: {reply:?}") };
    // What the agent got works for what it is for: these bytes as this one part of this one upload.
    http.send(&part, own_part, "upload part 1 as given").await?;
    let own_path = format!("{TEST_BUCKET}/{own_key}");
    let attempts = [
        ("read the object being uploaded", retarget(&part, &origin, "GET", &own_path)),
        ("delete the object being uploaded", retarget(&part, &origin, "DELETE", &own_path)),
        ("another part number", {
            let mut p = part.clone();
            p.url = p.url.replace("partNumber=1", "partNumber=2");
            p
        }),
        ("read alpha's backup", retarget(&part, &origin, "GET", &format!("{TEST_BUCKET}/{alpha_object}"))),
        ("head alpha's backup", retarget(&part, &origin, "HEAD", &format!("{TEST_BUCKET}/{alpha_object}"))),
        ("overwrite alpha's backup", retarget(&part, &origin, "PUT", &format!("{TEST_BUCKET}/{alpha_object}"))),
        ("delete alpha's backup", retarget(&part, &origin, "DELETE", &format!("{TEST_BUCKET}/{alpha_object}"))),
        ("plant alpha's manifest", retarget(&part, &origin, "PUT", &format!("{TEST_BUCKET}/{alpha_manifest}"))),
        ("list the bucket", retarget(&part, &origin, "GET", &format!("{TEST_BUCKET}?list-type=2"))),
    ];
    assert_all_refused(&http, &attempts).await;
    write_frame(&mut job.send, &JobMsg::Failed { error: "the attacker gives up".into() }).await?;
    let status = coordinator.wait_backup_status("evil", BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
    poll_until("the evil upload to be aborted", BACKUP_TIMEOUT, Duration::from_millis(250), || async {
        Ok(s3.leftover_uploads().is_empty().then_some(()))
    })
    .await?;
    evil.close().await;

    // A restore: a stolen node of beta asks for its own cluster's latest backup and keeps what it gets.
    let beta_creds = coordinator.issue_agent_credentials("beta", "m2").await?;
    let answers =
        agent_request(&coordinator, &beta_creds, &AdminRequest::Restore { cluster: None, backup: "latest".into() })
            .await?;
    received.push_str(&serde_json::to_string(&answers)?);
    let Some(AdminResponse::RestoreFrom { source: RestoreSource::S3 { head, get, .. }, backup, .. }) = answers.first()
    else {
        anyhow::bail!("a presigned S3 restore expected: {answers:?}")
    };
    let beta_spec = serde_json::to_value(&backup.spec)?;
    let beta_object = get.url.split_once('?').map_or("", |(p, _)| p).trim_start_matches(&format!("{origin}/"));
    let beta_object = beta_object.trim_start_matches(&format!("{TEST_BUCKET}/")).to_owned();
    // Exactly what it got reads exactly its backup.
    let body = http.send(get, Bytes::new(), "read beta's backup as given").await?.into_body().collect().await?;
    assert_eq!(
        hex::encode(Sha256::digest(body.into_bytes())),
        beta_spec["EtcdBackup"]["sha256"].as_str().unwrap_or_default()
    );
    http.send(head, Bytes::new(), "head beta's backup as given").await?;
    let beta_manifest = beta_object.replace(".snapshot.zst", ".manifest.json");
    let attempts = [
        ("read alpha's backup", retarget(get, &origin, "GET", &format!("{TEST_BUCKET}/{alpha_object}"))),
        ("head alpha's backup", retarget(head, &origin, "HEAD", &format!("{TEST_BUCKET}/{alpha_object}"))),
        ("read beta's manifest", retarget(get, &origin, "GET", &format!("{TEST_BUCKET}/{beta_manifest}"))),
        ("overwrite beta's backup", retarget(get, &origin, "PUT", &format!("{TEST_BUCKET}/{beta_object}"))),
        ("delete beta's backup", retarget(get, &origin, "DELETE", &format!("{TEST_BUCKET}/{beta_object}"))),
        ("plant beta's manifest", retarget(get, &origin, "PUT", &format!("{TEST_BUCKET}/{beta_manifest}"))),
        ("list the bucket", retarget(get, &origin, "GET", &format!("{TEST_BUCKET}?list-type=2"))),
        ("list with the HEAD signature", retarget(head, &origin, "GET", &format!("{TEST_BUCKET}?list-type=2"))),
    ];
    assert_all_refused(&http, &attempts).await;

    // No S3 secret in anything the agent received, and nothing in the bucket changed.
    assert!(!received.contains(TEST_SECRET_KEY), "an agent received the S3 secret key");
    assert!(!received.to_lowercase().contains("secretaccesskey"), "an agent received an S3 config");
    assert!(received.contains(TEST_ACCESS_KEY), "the presigned requests name the access key id (not a secret)");
    assert_eq!(bucket_digest(&s3).await?, before, "the attacker changed the bucket");
    Ok(())
}

#[tokio::test]
async fn what_a_hostile_agent_says_neither_picks_it_nor_dates_commits_or_holds_a_backup() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let options = CoordinatorOptions {
        extra_args: vec!["--byte-stall-timeout".into(), "4s".into()],
        ..CoordinatorOptions::default()
    };
    let coordinator = Coordinator::start(options).await?;
    let _agents = coordinator.start_agents("prod", &etcd).await?;

    // A stolen node of prod claims the highest possible applied index and a leader no one else names.
    let liar_creds = coordinator.issue_agent_credentials("prod", "m9").await?;
    let mut liar = HostileAgent::connect(&coordinator, &liar_creds).await?;
    // It also reports revision 0, which once turned the member check off for the whole cluster (issue 26).
    let lie =
        EtcdFacts { raft_applied_index: u64::MAX, leader: false, leader_id: 4242, revision: 0, ..sane_facts(999) };
    liar.report(lie).await?;
    coordinator.wait_agents_connected("prod", &["m1", "m9"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = backup_ok(&coordinator, "prod").await?;
    assert_eq!(status["member"], "m1", "the honest member is chosen: {status:#}");
    let check = &status["membercheck"];
    assert!(check["revision"].as_i64().unwrap_or_default() > 0, "the members were compared despite a 0: {status:#}");
    assert!(!liar.got_a_job_within(Duration::from_millis(500)).await, "the liar was sent a job");

    // A stolen node of "evil" sends bytes with a correct trailing sha256 that are no etcd snapshot.
    let evil_creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &evil_creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut junk: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let hash = Sha256::digest(&junk);
    junk.extend_from_slice(&hash);
    let far_future = Timestamp { seconds: 568_971_849_600, nanos: 0 }; // year 20000
    let reply = send_backup(&coordinator, &evil, &junk, far_future).await?;
    assert!(
        matches!(&reply, JobReply::Failed { .. }),
        "junk with a correct trailing hash must not be committed: {reply:?}"
    );
    // Why goes to the status and the log, not to the agent.
    let status = coordinator.backup_status("evil").await?;
    assert!(status["error"].as_str().unwrap_or_default().contains("not an etcd"), "{status:#}");
    assert!(!format!("{reply:?}").contains("not an etcd"), "the agent is told why: {reply:?}");
    assert!(coordinator.backups("evil").await?.is_empty(), "junk was listed as a backup");

    // A real snapshot, dated year 20000 by the agent: committed, dated by the coordinator's clock.
    let snapshot = etcd_snapshot(etcd.member(0).client_url()).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = send_backup(&coordinator, &evil, &snapshot, far_future).await?;
    assert!(matches!(reply, JobReply::Committed), "a whole snapshot is committed: {reply:?}");
    let backups = coordinator.backups("evil").await?;
    let spec = &backups[0]["spec"];
    let created = spec["createdat"]["seconds"].as_i64().unwrap_or_default();
    assert!((created - unix_now()).abs() < 120, "createdat is the coordinator's clock: {spec:#}");
    assert_eq!(spec["finishedat"]["seconds"], far_future.seconds, "the agent's time is kept as reported: {spec:#}");
    for args in [&["get", "etcdbackup"][..], &["get", "etcdbackupstatus"]] {
        coordinator.ctl().run(args).await?.ok().context("ferryctl shows year-20000 times")?;
    }

    // The same snapshot declared at revision i64::MAX - 1 (a restore bumping from it would add 1 and land far
    // below what watchers saw): not believed, nothing committed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let previous = coordinator.backup_status("evil").await?;
    let lying = EtcdFacts { revision: i64::MAX - 1, ..sane_facts(1) };
    let reply = send_backup_as(&coordinator, &evil, &snapshot, Timestamp::now(), lying).await;
    assert!(!matches!(reply, Ok(JobReply::Committed)), "a revision above the cluster's was committed");
    let status = coordinator.wait_next_backup_status("evil", &previous, BACKUP_TIMEOUT).await?;
    assert!(status["error"].as_str().unwrap_or_default().contains("not believed"), "{status:#}");
    assert_eq!(coordinator.backups("evil").await?.len(), 1, "only the honest backup is listed");

    // Progress messages without bytes do not keep a job alive.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let started = Instant::now();
    let ticker = tokio::spawn(async move {
        for i in 0..60u64 {
            if write_frame(&mut job.send, &JobMsg::Progress { raw_bytes: i * 1000 }).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let status = poll_until("the stalled job to fail", Duration::from_secs(30), Duration::from_millis(250), || async {
        let s = coordinator.backup_status("evil").await?;
        Ok((s["status"] == STATUS_ERROR).then_some(s))
    })
    .await?;
    ticker.abort();
    assert!(status["error"].as_str().unwrap_or_default().contains("no snapshot data"), "{status:#}");
    assert!(started.elapsed() < Duration::from_secs(15), "failed after {:?}", started.elapsed());
    liar.close().await;
    evil.close().await;
    Ok(())
}

/// The critical finding of the hostile review (issue 26): a part's presigned URL, sent with an unsigned
/// `x-amz-copy-source` header, is an `UploadPartCopy` of any object on servers that do not refuse unsigned
/// `x-amz-*` headers (s3s-fs executes it). A stolen node of "evil" copies alpha's backup into its own upload
/// and declares it exactly as alpha's manifest describes it (the attacker is given every hash and size):
/// nothing is committed, the agent's failure replies carry none of what the coordinator computed, and after
/// three refused backups the member is out of rotation with its alert metric set.
#[tokio::test]
async fn a_part_url_turned_into_a_copy_of_another_clusters_backup_commits_nothing() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let metrics_port = crate::fixtures::ports::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let options = CoordinatorOptions::s3(&["--upload-part-size-mib", "5", "--metrics-listen", &metrics]);
    let coordinator = Coordinator::start_s3(&s3, options).await?;
    let _alpha = coordinator.start_agents("alpha", &etcd).await?;
    backup_ok(&coordinator, "alpha").await?;
    let alpha = coordinator.backups("alpha").await?[0]["spec"].clone();
    let alpha_object = alpha["snapshot"].as_str().context("alpha's snapshot key")?.to_owned();
    let before = bucket_digest(&s3).await?;
    let http = PresignedClient::new("")?;
    let hash = |field: &str| -> anyhow::Result<[u8; 32]> {
        let h = hex::decode(alpha[field].as_str().unwrap_or_default())?;
        h.try_into().map_err(|_| anyhow::anyhow!("alpha's {field} is not a sha256: {alpha:#}"))
    };
    let secrets = [alpha["sha256"].as_str(), alpha["rawsha256"].as_str()].map(|s| s.unwrap_or("none").to_owned());

    let evil_creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &evil_creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut copies_executed = 0;
    for attempt in 1..=quarantine_strikes() {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let previous = coordinator.backup_status("evil").await.unwrap_or_default();
        coordinator.manual_backup("evil").await?;
        let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
        write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
        let own_part = Bytes::from(vec![attempt as u8; 1024]);
        write_frame(&mut job.send, &JobMsg::PartUrl { number: 1, digest: PartDigest::of(&own_part) }).await?;
        let reply: JobReply = expect_frame(&mut job.recv).await?;
        let JobReply::PartUrl { request: mut part, .. } = reply else {
            anyhow::bail!("a part URL expected: {reply:?}")
        };
        // The signed request, plus an unsigned header that makes it a copy of alpha's backup.
        part.headers.push(("x-amz-copy-source".into(), format!("/{TEST_BUCKET}/{alpha_object}")));
        let etag = match http.send(&part, own_part, "copy alpha's backup through a part URL").await {
            Ok(r) => {
                copies_executed += 1;
                let body = r.into_body().collect().await?.into_bytes();
                let body = String::from_utf8_lossy(&body).into_owned();
                body.split_once("<ETag>")
                    .and_then(|(_, r)| r.split_once("</ETag>"))
                    .map_or(String::new(), |(e, _)| e.replace("&quot;", "\""))
            }
            Err(e) => {
                assert!(matches!(e.kind, S3ErrorKind::AccessDenied | S3ErrorKind::BadSignature), "{e}");
                String::new()
            }
        };
        let summary = BackupSummary {
            raw_size: alpha["rawsize"].as_u64().unwrap_or_default(),
            raw_sha256: hash("rawsha256")?,
            compressed_size: alpha["size"].as_u64().unwrap_or_default(),
            compressed_sha256: hash("sha256")?,
            zstd_level: 3,
            started_at: Timestamp::now(),
            finished_at: Timestamp::now(),
            parts: vec![UploadedPart { number: 1, etag }],
            sealed: None,
        };
        write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
        let reply: JobReply = expect_frame(&mut job.recv).await?;
        let JobReply::Failed { error } = &reply else {
            anyhow::bail!("alpha's backup was committed as evil's: {reply:?}")
        };
        for secret in &secrets {
            assert!(
                !error.contains(secret.as_str()),
                "the failure reply names a hash the coordinator computed: {error}"
            );
        }
        assert!(!error.contains("bytes"), "the failure reply names a size: {error}");
        let status = coordinator.wait_next_backup_status("evil", &previous, BACKUP_TIMEOUT).await?;
        assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
        let why = status["error"].as_str().unwrap_or_default();
        assert!(why.contains("not the part the agent announced"), "the stored parts were compared: {status:#}");
    }
    // s3s-fs executes the copy; were it refused (as AWS S3 refuses unsigned x-amz-* headers), the stored part
    // would be missing and the comparison would refuse it as well.
    println!("copies the S3 server executed: {copies_executed}");
    assert!(coordinator.backups("evil").await?.is_empty(), "something was committed for evil");

    // Three refusals in a row: the member is out of rotation, and says so.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let previous = coordinator.backup_status("evil").await?;
    coordinator.manual_backup("evil").await?;
    let status = coordinator.wait_next_backup_status("evil", &previous, BACKUP_TIMEOUT).await?;
    assert!(status["error"].as_str().unwrap_or_default().contains("out of rotation"), "{status:#}");
    assert!(!evil.got_a_job_within(Duration::from_millis(500)).await, "a member out of rotation was sent a job");
    let (_, text) = crate::observe::http_get(metrics_port, "/metrics")?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("ferry_member_out_of_rotation{") && l.contains("\"evil\"") && l.ends_with(" 1")),
        "ferry_member_out_of_rotation is 1 for evil/m1:\n{text}"
    );
    poll_until("evil's uploads to be aborted", BACKUP_TIMEOUT, Duration::from_millis(250), || async {
        Ok(s3.leftover_uploads().is_empty().then_some(()))
    })
    .await?;
    assert_eq!(bucket_digest(&s3).await?, before, "the bucket changed (alpha's backup, or something of evil's)");
    evil.close().await;
    Ok(())
}

/// Issue 29: with uploads verified by their parts (the default), an agent uploads other bytes than it
/// announced — the same length, so the signed `Content-Length` holds — on a store that does not check the
/// signed `Content-MD5` (s3s-fs), and lies about the store's answer (it reports the announced MD5 as the
/// part's ETag) and about the whole (its summary describes the announced bytes). The parts' sizes match,
/// but the completed object's multipart ETag is the MD5 of what was stored, not of what was announced:
/// nothing is recorded, the object is deleted, and the agent learns nothing of why.
#[tokio::test]
async fn an_agent_uploading_other_bytes_than_it_announced_gets_nothing_recorded() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = bucket_digest(&s3).await?;

    // What it announces and declares: a whole zstd-compressed snapshot with every hash right.
    let raw = junk_ending_in_its_sha256();
    let announced = zstd::encode_all(&raw[..], 3)?;
    // What it uploads: other bytes of the same length (and the same zstd magic, for the framing check).
    let mut sent = announced.clone();
    let middle = sent.len() / 2;
    sent[middle] ^= 0xff;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let answered = job.upload_part(1, &announced, &sent).await?;
    let lie = format!("\"{}\"", hex::encode(PartDigest::of(&announced).md5));
    assert_ne!(answered, lie, "the store answered the MD5 of what it stored");
    let summary = one_part_summary(&raw, &announced, lie);
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    let reply: JobReply = expect_frame(&mut job.recv).await?;
    let JobReply::Failed { error } = &reply else { anyhow::bail!("other bytes were committed: {reply:?}") };
    assert!(!error.contains("ETag") && !error.contains("bytes"), "the agent is told why: {error}");
    let status = coordinator.wait_backup_status("evil", BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
    let why = status["error"].as_str().unwrap_or_default();
    assert!(why.contains("not the multipart ETag of the announced parts"), "the completed object's ETag: {status:#}");
    assert!(coordinator.backups("evil").await?.is_empty(), "something was recorded for evil");
    poll_until("evil's upload to be gone", BACKUP_TIMEOUT, Duration::from_millis(250), || async {
        Ok(s3.leftover_uploads().is_empty().then_some(()))
    })
    .await?;
    assert_eq!(bucket_digest(&s3).await?, before, "the completed object (or a manifest) was kept");
    evil.close().await;
    Ok(())
}

/// 64 KiB of junk ending in its own sha256, as etcd's snapshot ends in one: every hash declared of it is right.
fn junk_ending_in_its_sha256() -> Vec<u8> {
    let mut junk: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let hash = Sha256::digest(&junk);
    junk.extend_from_slice(&hash);
    junk
}

/// What an agent declares of `raw`, compressed to `object` and uploaded as one part answered with `etag`.
fn one_part_summary(raw: &[u8], object: &[u8], etag: String) -> BackupSummary {
    BackupSummary {
        raw_size: raw.len() as u64,
        raw_sha256: Sha256::digest(raw).into(),
        compressed_size: object.len() as u64,
        compressed_sha256: Sha256::digest(object).into(),
        zstd_level: 3,
        started_at: Timestamp::now(),
        finished_at: Timestamp::now(),
        parts: vec![UploadedPart { number: 1, etag }],
        sealed: None,
    }
}

/// Refused backups in a row that take a member out of rotation (the coordinator's `quarantine::STRIKES`).
fn quarantine_strikes() -> u32 {
    3
}

/// Asks for a backup of "evil", plays its agent sending `raw` (compressed) with lying dates, returns the verdict.
async fn send_backup(
    coordinator: &Coordinator,
    evil: &HostileAgent,
    raw: &[u8],
    dated: Timestamp,
) -> anyhow::Result<JobReply> {
    send_backup_as(coordinator, evil, raw, dated, sane_facts(1)).await
}

/// [`send_backup`] with `facts` as the snapshot's facts at its start.
async fn send_backup_as(
    coordinator: &Coordinator,
    evil: &HostileAgent,
    raw: &[u8],
    dated: Timestamp,
    facts: EtcdFacts,
) -> anyhow::Result<JobReply> {
    coordinator.manual_backup("evil").await?;
    let job = evil.next_job(BACKUP_TIMEOUT).await?;
    send_snapshot(job, raw, facts, dated).await
}

#[tokio::test]
async fn names_that_leave_the_store_are_refused_and_backup_files_are_private() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(20).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents("prod", &etcd).await?;
    backup_ok(&coordinator, "prod").await?;
    let dir = test_dir("least-privilege-files")?;
    let out = dir.path().join("out.zst");
    let out_str = out.display().to_string();
    let ctl = coordinator.ctl();

    for args in [
        vec!["backup", "download", "../backups/prod", "latest", "-o", &out_str],
        vec!["backup", "download", "prod", "../../state", "-o", &out_str],
        vec!["get", "etcdbackup", "--selector", "ferry.dev/cluster=.."],
    ] {
        let r = ctl.run(&args).await?;
        assert!(!r.success(), "`{}` must be refused: {}", r.command, r.stdout);
        let stderr = r.stderr.trim();
        assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
        assert!(stderr.contains("invalid"), "`{}`: {stderr}", r.command);
    }
    assert!(!out.exists(), "a refused download wrote {out_str}");

    // A link planted at the download's temp path is not written through.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep")?;
    std::os::unix::fs::symlink(&victim, dir.path().join(".out.zst.part"))?;
    coordinator.download_backup("prod", "latest", &out, false).await?;
    assert_eq!(std::fs::read_to_string(&victim)?, "keep", "the download wrote through a planted link");

    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&out)?, 0o600, "downloaded backup");
    let state = coordinator.state_dir();
    let creds = coordinator.issue_agent_credentials("prod", "m5").await?;
    for d in
        [state.clone(), state.join("pki"), coordinator.store_dir(), coordinator.store_dir().join("prod"), creds.clone()]
    {
        assert_eq!(mode(&d)?, 0o700, "{} must be 0700", d.display());
    }
    let mut files = vec![state.join("state.redb"), state.join("admin.ferryconfig"), state.join("pki/ca.key")];
    files.extend(crate::fixtures::files_under(&coordinator.store_dir())?);
    files.extend(crate::fixtures::files_under(&creds)?);
    for f in files {
        assert_eq!(mode(&f)?, 0o600, "{} must be 0600", f.display());
    }
    Ok(())
}

#[tokio::test]
async fn one_agent_certificate_cannot_open_connections_without_bound() -> anyhow::Result<()> {
    const CAP: usize = 16; // coordinator::net::MAX_CONNECTIONS_PER_IDENTITY
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..CAP + 4 {
        match HostileAgent::hold_request_connection(&coordinator, &creds).await {
            Ok(a) => open.push(a),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((open.len(), refused), (CAP, 4), "the cap holds per identity");
    // A connection that says nothing after its hello is dropped (request deadline).
    let silent = std::time::Instant::now();
    let first = open.remove(0);
    tokio::time::timeout(Duration::from_secs(20), first.closed()).await.context("a silent connection stays open")?;
    assert!(silent.elapsed() < Duration::from_secs(15));
    // Another identity is not affected, and closing frees the slots.
    let other = coordinator.issue_agent_credentials("good", "m1").await?;
    HostileAgent::hold_request_connection(&coordinator, &other).await?.close().await;
    for a in open {
        a.close().await;
    }
    poll_until("a slot to free up", Duration::from_secs(10), Duration::from_millis(200), || async {
        Ok(HostileAgent::hold_request_connection(&coordinator, &creds).await.ok().map(|_| ()))
    })
    .await?;
    Ok(())
}

/// Issue 26, finding 2 (in part): a backup is bound to its cluster. The members of cluster "evil" report the
/// etcd member ids of their etcd (a 3-member cluster); whichever of them gets the job sends a valid snapshot of
/// *another* etcd, with every hash right: refused, since its `members` bucket holds none of the ids the
/// cluster's members report. Its own etcd's snapshot is committed.
#[tokio::test]
async fn a_snapshot_of_another_etcd_cluster_is_refused_by_its_members() -> anyhow::Result<()> {
    let own = EtcdCluster::start(3).await?;
    own.put_keys(20).await?;
    let other = EtcdCluster::start(1).await?;
    other.put_keys(20).await?;
    let mut client = own.client().await?;
    let ids: Vec<u64> = client.member_list().await?.members().iter().map(|m| m.id()).collect();
    anyhow::ensure!(ids.len() == 3, "three members: {ids:?}");
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut agents = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let member = format!("m{}", i + 1);
        let creds = coordinator.issue_agent_credentials("evil", &member).await?;
        let mut a = HostileAgent::connect(&coordinator, &creds).await?;
        a.report(EtcdFacts { leader: i == 0, leader_id: ids[0], ..sane_facts(*id) }).await?;
        agents.push(a);
    }
    coordinator.wait_agents_connected("evil", &["m1", "m2", "m3"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let foreign = etcd_snapshot(other.member(0).client_url()).await?;
    let genuine = etcd_snapshot(own.member(0).client_url()).await?;
    for (what, snapshot, committed) in [("another etcd's snapshot", &foreign, false), ("its own", &genuine, true)] {
        let previous = coordinator.backup_status("evil").await.unwrap_or_default();
        coordinator.manual_backup("evil").await?;
        // Whichever member is chosen answers, and so does each the coordinator fails over to.
        let mut replies = Vec::new();
        let status = loop {
            let job = tokio::select! {
                j = agents[0].next_job(BACKUP_TIMEOUT) => j?,
                j = agents[1].next_job(BACKUP_TIMEOUT) => j?,
                j = agents[2].next_job(BACKUP_TIMEOUT) => j?,
                s = coordinator.wait_next_backup_status("evil", &previous, BACKUP_TIMEOUT) => break s?,
            };
            replies.push(send_snapshot(job, snapshot, sane_facts(ids[1]), Timestamp::now()).await?);
        };
        let any_committed = replies.iter().any(|r| matches!(r, JobReply::Committed));
        assert_eq!(any_committed, committed, "{what}: {replies:?} {status:#}");
        if !committed {
            assert!(status["error"].as_str().unwrap_or_default().contains("not the cluster's"), "{what}: {status:#}");
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(coordinator.backups("evil").await?.len(), 1, "only its own snapshot is listed");
    for a in agents {
        a.close().await;
    }
    Ok(())
}

/// A manual backup of `cluster`; its status once done. The liar answers the member check as an etcd that
/// cannot be asked, and drops a backup job if it gets one (the coordinator then moves on to an honest member).
async fn backup_past_a_liar(coordinator: &Coordinator, cluster: &str, liar: &HostileAgent) -> anyhow::Result<Value> {
    let previous = coordinator.backup_status(cluster).await.unwrap_or_default();
    coordinator.manual_backup(cluster).await?;
    loop {
        tokio::select! {
            j = liar.next_job(BACKUP_TIMEOUT) => drop(j?),
            s = coordinator.wait_next_backup_status(cluster, &previous, BACKUP_TIMEOUT) => return s,
        }
    }
}

/// Recomputes etcd's trailing sha256 of an altered snapshot, as an attacker would.
fn reseal(snapshot: &mut [u8]) {
    let n = snapshot.len() - 32;
    let trailer: [u8; 32] = Sha256::digest(&snapshot[..n]).into();
    snapshot[n..].copy_from_slice(&trailer);
}

/// Drills `cluster` every 2 s and waits for a drill of backup `id` that `done` accepts; returns its status.
async fn drill_of(
    coordinator: &Coordinator,
    cluster: &str,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut c = coordinator.ctl().get_json("cluster", Some(cluster)).await?;
    c["spec"]["backupconfiguration"] = serde_json::json!({
        "interval": { "seconds": 3600, "nanos": 0 },
        "drillinterval": { "seconds": 2, "nanos": 0 },
    });
    coordinator.ctl().apply_yaml(&serde_json::to_string(&c)?).await?.ok()?;
    poll_until(&format!("a drill of {id}"), Duration::from_secs(180), Duration::from_millis(500), || async {
        let drill = coordinator.backup_status(cluster).await?["drill"].clone();
        Ok((drill["backup"] == id && done(&drill)).then_some(drill))
    })
    .await
}

/// Issue 26, finding 10: a member held its cluster's backup "running" with no bytes by asking for a new part
/// URL every 119 s (each new part moved the byte-stall deadline). A part's URL is now handed out only once the
/// parts before those in flight are stored.
#[tokio::test]
async fn part_urls_are_not_handed_out_ahead_of_stored_parts() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&["--upload-parts-in-flight", "2"])).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    // Parts 1..=3 (two in flight, one more being cut) are handed out with nothing stored; part 4 is not.
    for number in 1..=4u32 {
        let part = vec![number as u8; 1024];
        write_frame(&mut job.send, &JobMsg::PartUrl { number, digest: PartDigest::of(&part) }).await?;
        let reply = tokio::time::timeout(Duration::from_secs(20), read_frame::<_, JobReply>(&mut job.recv)).await?;
        match (number, reply) {
            (1..=3, Ok(Some(JobReply::PartUrl { number: n, .. }))) if n == number => {}
            (4, Ok(None) | Err(_)) => {}
            (n, other) => anyhow::bail!("part {n}: {other:?}"),
        }
    }
    let status = coordinator.wait_backup_status("evil", BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
    assert!(status["error"].as_str().unwrap_or_default().contains("must be stored first"), "{status:#}");
    evil.close().await;
    Ok(())
}

/// Plays the agent of `job`: sends `raw` (zstd-compressed, with every hash right) as its snapshot taken at
/// `facts`, dated `dated` by the agent, and returns the coordinator's verdict.
async fn send_snapshot(
    mut job: crate::fixtures::hostile::HostileJob,
    raw: &[u8],
    facts: EtcdFacts,
    dated: Timestamp,
) -> anyhow::Result<JobReply> {
    write_frame(&mut job.send, &JobMsg::Started(facts)).await?;
    let stored = zstd::encode_all(raw, 3)?;
    for chunk in stored.chunks(256 * 1024) {
        write_frame(&mut job.send, &JobMsg::Data(chunk.to_vec())).await?;
    }
    let summary = BackupSummary {
        raw_size: raw.len() as u64,
        raw_sha256: Sha256::digest(raw).into(),
        compressed_size: stored.len() as u64,
        compressed_sha256: Sha256::digest(&stored).into(),
        zstd_level: 3,
        started_at: dated,
        finished_at: dated,
        parts: Vec::new(),
        sealed: None,
    };
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    Ok(expect_frame(&mut job.recv).await?)
}

/// Issue 26, finding 8: a 66 KB upload declared as a 2 GiB snapshot was committed, and every drill then wrote
/// 4 GiB. A snapshot more than twice the database size the cluster's members report is not believed.
#[tokio::test]
async fn a_snapshot_declared_far_larger_than_the_database_is_refused() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?; // a 1 MiB database
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let stored = zstd::encode_all(&vec![0u8; 1 << 20][..], 19)?;
    write_frame(&mut job.send, &JobMsg::Data(stored.clone())).await?;
    let summary = BackupSummary {
        raw_size: 2 << 30,
        raw_sha256: [0; 32],
        compressed_size: stored.len() as u64,
        compressed_sha256: Sha256::digest(&stored).into(),
        zstd_level: 19,
        started_at: Timestamp::now(),
        finished_at: Timestamp::now(),
        parts: Vec::new(),
        sealed: None,
    };
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    let status = coordinator.wait_backup_status("evil", BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_ERROR, "{status:#}");
    assert!(status["error"].as_str().unwrap_or_default().contains("twice the database size"), "{status:#}");
    assert!(coordinator.backups("evil").await?.is_empty());
    evil.close().await;
    Ok(())
}

/// Issue 26, findings 2 and 4: the revision recorded was the agent's word, and a restore's bump is planned from
/// it. The snapshot's own revision is read as it streams (the highest revision key its bbolt pages hold, or
/// its finished compaction): a member declaring more than the snapshot holds is refused.
#[tokio::test]
async fn a_revision_above_what_the_snapshot_holds_is_refused() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let holds = etcd.put_keys(30).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    // Its reports say the cluster is far ahead, so the declared revision is within what was seen.
    let ahead = EtcdFacts { revision: holds + 40_000, ..sane_facts(1) };
    evil.report(ahead.clone()).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snapshot = etcd_snapshot(etcd.member(0).client_url()).await?;
    for (declared, committed) in [(holds + 40_000, false), (holds, true)] {
        let previous = coordinator.backup_status("evil").await.unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        coordinator.manual_backup("evil").await?;
        let job = evil.next_job(BACKUP_TIMEOUT).await?;
        let reply =
            send_snapshot(job, &snapshot, EtcdFacts { revision: declared, ..ahead.clone() }, Timestamp::now()).await?;
        let status = coordinator.wait_next_backup_status("evil", &previous, BACKUP_TIMEOUT).await?;
        assert_eq!(matches!(reply, JobReply::Committed), committed, "declared {declared}: {reply:?} {status:#}");
        if !committed {
            let error = status["error"].as_str().unwrap_or_default();
            assert!(error.contains(&format!("it holds revision {holds}")), "{status:#}");
        }
    }
    let backups = coordinator.backups("evil").await?;
    assert_eq!(backups.len(), 1, "{backups:#?}");
    assert_eq!(backups[0]["spec"]["revision"], holds);
    evil.close().await;
    Ok(())
}

/// Issue 26, finding 2: a snapshot with a corrupted bbolt page (trailing hash recomputed) was listed and drilled
/// "OK" while etcd's own tool panics on it. Every hash is right, so it commits (only the member's own cluster
/// lists it); its drill runs etcd on it, fails, and says so; it never becomes the last passed backup.
#[tokio::test]
async fn a_snapshot_with_a_corrupted_page_fails_its_drill() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(200).await?;
    let extra = ["--min-drill-interval", "1s"].map(str::to_owned).to_vec();
    let coordinator = Coordinator::start(CoordinatorOptions { extra_args: extra, ..Default::default() }).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every leaf page of etcd's `key` bucket (its first key is a revision: 8 bytes, `_`, 8 bytes) turned
    // into a freelist page; etcd's trailing hash recomputed.
    let mut snapshot = etcd_snapshot(etcd.member(0).client_url()).await?;
    let page_size = u32::from_le_bytes(snapshot[24..28].try_into()?) as usize;
    let mut corrupted = 0;
    for at in (0..snapshot.len() - 32).step_by(page_size).skip(2) {
        let page = &snapshot[at..at + page_size];
        let (id, flags, count) = (u64::from_le_bytes(page[..8].try_into()?), page[8], page[10]);
        let (pos, ksize) = (u32::from_le_bytes(page[20..24].try_into()?) as usize, page[24]);
        let key = page.get(16 + pos..16 + pos + 17).unwrap_or_default();
        if id as usize * page_size == at && flags == 0x02 && count > 0 && ksize == 17 && key[8] == b'_' {
            snapshot[at + 8] = 0x10;
            corrupted += 1;
        }
    }
    anyhow::ensure!(corrupted > 0, "no leaf page of the key bucket found");
    reseal(&mut snapshot);
    let reply = send_backup(&coordinator, &evil, &snapshot, Timestamp::now()).await?;
    assert!(matches!(reply, JobReply::Committed), "every hash is right: {reply:?}");
    let id = coordinator.backups("evil").await?[0]["metadata"]["id"].as_str().context("id")?.to_owned();

    let drill = drill_of(&coordinator, "evil", &id, |d| d["time"].is_object()).await?;
    assert_eq!(drill["result"], STATUS_ERROR, "{drill:#}");
    assert!(drill["error"].as_str().unwrap_or_default().contains("etcd's tool panicked"), "{drill:#}");
    assert_ne!(drill["lastpassedbackup"], id.as_str(), "{drill:#}");
    evil.close().await;
    Ok(())
}

/// The bound above used the members' last reports (every 10 s): a backup asked for right after the database
/// more than doubled was refused as a lie. The member check's answers, taken as the backup starts, carry each
/// member's database size now.
#[tokio::test]
async fn a_database_that_doubled_since_the_last_report_is_backed_up() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("prod", "m1").await?;
    let _agent = crate::fixtures::Agent::start(&coordinator, &creds, etcd.member(0).client_url())?;
    coordinator.wait_agents_connected("prod", &["m1"], BACKUP_TIMEOUT).await?;
    // Right after a report (the agent reported the revision of this put), the database grows to ~80 MiB.
    let mut client = etcd.client().await?;
    let mark = client.put("/mark", "1", None).await?.header().map(|h| h.revision()).context("revision")?;
    poll_until("a report of the mark", Duration::from_secs(30), Duration::from_millis(100), || async {
        let agents = coordinator.connected_agents("prod").await?;
        Ok(agents.iter().any(|a| a["spec"]["revision"].as_i64() == Some(mark)).then_some(()))
    })
    .await?;
    let reported = std::time::Instant::now();
    let value: Vec<u8> = (0..1_400_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for i in 0..60 {
        let mut v = value.clone();
        v[..4].copy_from_slice(&(i as u32).to_le_bytes());
        client.put(format!("/big/{i}"), v, None).await?;
    }
    let status = backup_ok(&coordinator, "prod").await?;
    let raw = coordinator.backups("prod").await?[0]["spec"]["rawsize"].as_u64().unwrap_or(0);
    assert!(raw > 64 << 20, "the snapshot is over the 64 MiB floor of the bound: {raw} {status:#}");
    eprintln!("backed up {raw} bytes {:.1} s after the last report", reported.elapsed().as_secs_f64());
    Ok(())
}

/// Issue 26, finding 12: one agent certificate reconnecting in a loop (1 174 times in 20 s in the review) cost
/// three state writes per connection and nothing reported it. Now a member's record is written at most every
/// few seconds (a disconnect the record does not show yet excepted), and every reconnect is counted in
/// `ferry_agent_reconnects_total`, which `FerryAgentReconnectLoop` alerts on.
#[tokio::test]
async fn one_certificate_reconnecting_in_a_loop_is_counted_and_costs_few_writes() -> anyhow::Result<()> {
    const LOOPS: usize = 60;
    let metrics_port = crate::fixtures::ports::free_port();
    let options = CoordinatorOptions {
        extra_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{metrics_port}")],
        ..CoordinatorOptions::default()
    };
    let coordinator = Coordinator::start(options).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let version = |c: &Coordinator| {
        let ctl = c.ctl();
        async move {
            let a = ctl.get_json("agent", Some("evil/m1")).await?;
            anyhow::Ok(a["metadata"]["version"].as_u64().unwrap_or_default())
        }
    };
    let mut first = HostileAgent::connect(&coordinator, &creds).await?;
    first.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    first.close().await;
    let started = Instant::now();
    let before = version(&coordinator).await?;
    for _ in 0..LOOPS {
        let mut a = HostileAgent::connect(&coordinator, &creds).await?;
        a.report(sane_facts(1)).await?;
        a.close().await;
    }
    let took = started.elapsed();
    // Let the last disconnect land, then count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = version(&coordinator).await? - before;
    let budget = 2 * (took.as_secs() / 5 + 2);
    assert!(
        writes <= budget,
        "{LOOPS} reconnects in {took:?} wrote the agent's record {writes} times (budget {budget})"
    );
    let (_, text) = crate::observe::http_get(metrics_port, "/metrics")?;
    let counted = text
        .lines()
        .find(|l| l.starts_with("ferry_agent_reconnects_total{") && l.contains("\"evil\"") && l.contains("\"m1\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(counted, Some(LOOPS as f64), "every reconnect is counted:\n{text}");
    // The record ends up saying what is true: disconnected.
    let agent = coordinator.ctl().get_json("agent", Some("evil/m1")).await?;
    assert_eq!(agent["spec"]["connected"], false, "{agent:#}");
    eprintln!("reconnect loop: {LOOPS} connections in {took:?}, {writes} record writes");
    Ok(())
}

/// A request connection that asks for a backup and then stops reading is dropped once it makes no progress
/// (30 s, `api::backups::STREAM_PROGRESS_TIMEOUT`), so it holds no slot, store reader or buffers for long.
#[tokio::test]
async fn a_download_the_client_stops_reading_is_dropped() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    // Random values: the object stays larger than QUIC's flow-control windows, so unread data blocks writes.
    etcd.put_random_values(8 << 20, 7).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents("prod", &etcd).await?;
    coordinator.manual_backup("prod").await?;
    let status = coordinator.wait_backup_status("prod", Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status}");

    // The attacker holds a real agent certificate of the cluster, asks for its latest backup, reads the
    // first answer and then nothing.
    let creds = coordinator.issue_agent_credentials("prod", "m9").await?;
    let creds = AgentCredentials::load(&creds)?;
    let request = AdminRequest::Restore { cluster: None, backup: "latest".into() };
    let mut session = Session::open(&coordinator.addr(), &creds.ca_pem, &creds.client, &request).await?;
    let first: AdminResponse = expect_frame(&mut session.recv).await?;
    assert!(matches!(first, AdminResponse::RestoreFrom { .. }), "{first:?}");
    let stalled = Instant::now();
    poll_until(
        "the coordinator to drop the stalled download",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || async {
            let log = std::fs::read_to_string(coordinator.log_path())?;
            Ok(log.contains("the client read nothing for 30s").then_some(()))
        },
    )
    .await?;
    assert!(stalled.elapsed() >= Duration::from_secs(25), "dropped only after the progress timeout");
    // What was buffered can still be read; then the stream ends without `DownloadEnd`.
    let ended_cleanly = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match read_frame::<_, AdminResponse>(&mut session.recv).await {
                Ok(Some(AdminResponse::DownloadEnd)) => return true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    })
    .await
    .context("the dropped stream neither ended nor failed")?;
    assert!(!ended_cleanly, "the stalled download was completed after all");
    Ok(())
}

/// Issue 29: the members are compared at a compaction whose hash etcd keeps, so that no `HashKV` makes etcd
/// hash its key space afresh (stalling its writes). Which compactions a member holds is its agent's word: a
/// hostile m3 claiming thousands of them, none of which the honest members hold, cannot make the check ask
/// them there. m1 and m2 (scan limit 0: they never hash afresh) are compared at the compaction they saw.
#[tokio::test]
async fn a_member_lying_about_its_compaction_hashes_cannot_choose_where_the_others_are_hashed() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(50).await?;
    let mut m3_client = crate::fixtures::etcd::connect(&[etcd.member(2).client_url().to_owned()]).await?;
    let header = m3_client.status().await?.header().cloned().context("status header")?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut honest = Vec::new();
    for member in &etcd.members()[..2] {
        let creds = coordinator.issue_agent_credentials("prod", member.name()).await?;
        let args = ["--hashkv-scan-limit-mib".to_owned(), "0".to_owned()];
        honest.push(crate::fixtures::Agent::start_with_args(&coordinator, &creds, member.client_url(), &args)?);
    }
    let creds = coordinator.issue_agent_credentials("prod", "m3").await?;
    let mut liar = HostileAgent::connect(&coordinator, &creds).await?;
    coordinator.wait_agents_connected("prod", &["m1", "m2"], BACKUP_TIMEOUT).await?;

    let mut client = etcd.client().await?;
    let revision = client.get("any", None).await?.header().map(|h| h.revision()).context("revision")?;
    // An agent reports a compaction once it has seen it for a minute (etcd keeps the hash only when its
    // batched compaction has run).
    client.compact(revision, None).await?;
    poll_until("m1 and m2 to see the compaction", Duration::from_secs(120), Duration::from_millis(500), || async {
        let agents = coordinator.connected_agents("prod").await?;
        Ok((agents.iter().filter(|a| a["spec"]["hashedcompaction"] == revision).count() == 2).then_some(()))
    })
    .await?;
    let lies: Vec<i64> = (revision + 1..revision + 5000).chain([i64::MAX, -1, 0]).collect();
    let facts = EtcdFacts {
        member_id: header.member_id(),
        cluster_id: header.cluster_id(),
        revision: revision + 10_000,
        leader: false,
        hashed_compactions: lies,
        ..sane_facts(header.member_id())
    };
    liar.report(facts).await?;
    coordinator.wait_agents_connected("prod", &["m1", "m2", "m3"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let status = backup_past_a_liar(&coordinator, "prod", &liar).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    let check = &status["membercheck"];
    assert_eq!(check["revision"], revision, "compared at the compaction the honest members hold: {status:#}");
    assert_eq!(check["diverged"], serde_json::json!([]), "{status:#}");
    assert_eq!(check["unreachable"], serde_json::json!(["m3"]), "m1 and m2 were compared: {status:#}");
    for a in &honest {
        let log = std::fs::read_to_string(a.log_path())?;
        assert!(!log.contains("afresh"), "{}", a.log_path().display());
    }
    liar.close().await;
    Ok(())
}

/// Issue 29: an S3 upload verified by its parts (the default) is not opened at commit, so a member can get
/// well-framed junk, every part exactly as announced, listed for its own cluster (and for no other). Proving
/// content is the drill's job: it fails on the junk and says why.
#[tokio::test]
async fn junk_uploaded_exactly_as_announced_is_listed_for_its_cluster_only_and_failed_by_the_drill(
) -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&["--min-drill-interval", "1s"])).await?;
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(&coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let raw = junk_ending_in_its_sha256();
    let object = zstd::encode_all(&raw[..], 3)?;
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(BACKUP_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let etag = job.upload_part(1, &object, &object).await?;
    let summary = one_part_summary(&raw, &object, etag);
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    let reply: JobReply = expect_frame(&mut job.recv).await?;
    assert!(matches!(reply, JobReply::Committed), "parts as announced are committed: {reply:?}");
    let backups = coordinator.backups("evil").await?;
    let id = backups[0]["metadata"]["id"].as_str().context("backup id")?.to_owned();
    assert_eq!(backups[0]["metadata"]["annotations"]["ferry.dev/verification"], "parts", "{backups:#?}");

    let drill = drill_of(&coordinator, "evil", &id, |d| d["result"] == STATUS_ERROR).await?;
    assert!(!drill["error"].as_str().unwrap_or_default().is_empty(), "the drill says why: {drill:#}");
    assert!(coordinator.backups("prod").await?.is_empty(), "nothing is listed for any other cluster");
    evil.close().await;
    Ok(())
}

/// Issue 26, finding 2: a member's real snapshot with one value rewritten and etcd's trailing hash recomputed
/// restored perfectly, passed its drill, and retention then kept it above all others. A drill now hashes the
/// restored key space with etcd's `HashKV` and compares it with what the *other* members' etcd answer at that
/// revision: the doctored backup fails its drill and never becomes the last passed; an honest member's backup
/// agrees and does.
#[tokio::test]
async fn a_doctored_snapshot_fails_its_drill_against_the_other_members_hashes() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(50).await?;
    let mut client = etcd.client().await?;
    client.put("/registry/secrets/default/admin-token", "genuine-token-000", None).await?;
    let extra = ["--min-drill-interval", "1s"].map(str::to_owned).to_vec();
    let coordinator = Coordinator::start(CoordinatorOptions { extra_args: extra, ..Default::default() }).await?;
    // The liar holds a follower's certificate (a leader is chosen only after every follower); the other two
    // members run real agents.
    let mut statuses = Vec::new();
    for member in etcd.members() {
        let mut c = crate::fixtures::etcd::connect(&[member.client_url().to_owned()]).await?;
        statuses.push(c.status().await?);
    }
    let liar_at = (0..3).find(|i| statuses[*i].header().is_some_and(|h| h.member_id() != statuses[*i].leader()));
    let liar_at = liar_at.context("a follower")?;
    let liar_name = etcd.member(liar_at).name().to_owned();
    let mut honest = Vec::new();
    for (i, member) in etcd.members().iter().enumerate().filter(|(i, _)| *i != liar_at) {
        let creds = coordinator.issue_agent_credentials("prod", member.name()).await?;
        honest.push((i, crate::fixtures::Agent::start(&coordinator, &creds, member.client_url())?));
    }
    let st = &statuses[liar_at];
    let header = st.header().cloned().context("status header")?;
    let facts = EtcdFacts {
        member_id: header.member_id(),
        cluster_id: header.cluster_id(),
        db_size: st.db_size(),
        raft_applied_index: st.raft_applied_index(),
        revision: header.revision(),
        leader: false,
        leader_id: st.leader(),
        ..sane_facts(header.member_id())
    };
    let creds = coordinator.issue_agent_credentials("prod", &liar_name).await?;
    let mut liar = HostileAgent::connect(&coordinator, &creds).await?;
    liar.report(facts.clone()).await?;
    coordinator.wait_agents_connected("prod", &["m1", "m2", "m3"], BACKUP_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The liar's genuine snapshot, one value rewritten in place (same length), etcd's trailing hash recomputed.
    let mut doctored = etcd_snapshot(etcd.member(liar_at).client_url()).await?;
    let at = doctored.windows(17).position(|w| w == b"genuine-token-000").context("the value in the snapshot")?;
    doctored[at..at + 17].copy_from_slice(b"attacker-token-00");
    reseal(&mut doctored);

    // Followers take turns: back up until the liar was chosen and its doctored snapshot committed. It answers
    // the member check with its etcd's true hash (members that were not compared are tried last).
    let mut doctored_id = None;
    for _ in 0..6 {
        let previous = coordinator.backup_status("prod").await.unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        coordinator.manual_backup("prod").await?;
        let mut reply = None;
        let status = loop {
            tokio::select! {
                j = liar.next_job_hashing(BACKUP_TIMEOUT, etcd.member(liar_at).client_url()) => {
                    reply = Some(send_snapshot(j?, &doctored, facts.clone(), Timestamp::now()).await?);
                }
                s = coordinator.wait_next_backup_status("prod", &previous, BACKUP_TIMEOUT) => break s?,
            }
        };
        if matches!(reply, Some(JobReply::Committed)) {
            assert_eq!(status["member"], liar_name.as_str(), "{status:#}");
            let newest = coordinator.backups("prod").await?;
            doctored_id = newest[0]["metadata"]["id"].as_str().map(str::to_owned);
            break;
        }
    }
    let doctored_id = doctored_id.context("the liar was never chosen for a backup")?;

    let drill = drill_of(&coordinator, "prod", &doctored_id, |d| d["time"].is_object()).await?;
    assert_eq!(drill["result"], STATUS_ERROR, "{drill:#}");
    let error = drill["error"].as_str().unwrap_or_default();
    assert!(error.contains("not the data the cluster held"), "{drill:#}");
    assert!(error.contains(&format!("taken by member {liar_name}")), "{drill:#}");
    assert_ne!(drill["lastpassedbackup"], doctored_id.as_str(), "{drill:#}");

    // An honest member's backup (the liar drops its jobs) agrees with the other members and becomes the proof.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = backup_past_a_liar(&coordinator, "prod", &liar).await?;
    assert_eq!(status["status"], STATUS_OK, "{status:#}");
    let honest_id = coordinator.backups("prod").await?[0]["metadata"]["id"].as_str().context("id")?.to_owned();
    let drill =
        poll_until("the drill of the honest backup", Duration::from_secs(120), Duration::from_millis(500), || async {
            let drill = coordinator.backup_status("prod").await?["drill"].clone();
            Ok((drill["backup"] == honest_id.as_str() && drill["result"] == STATUS_OK).then_some(drill))
        })
        .await?;
    assert_eq!(drill["lastpassedbackup"], honest_id.as_str(), "{drill:#}");
    let agreement = drill["agreement"].as_str().unwrap_or_default();
    assert!(agreement.starts_with("agrees with m") && !agreement.contains(&liar_name), "{drill:#}");
    liar.close().await;
    Ok(())
}

/// Issue 26, finding 3: any agent's `Restore` request pinned the restore's revision floor for a day, so a real
/// restore hours later landed below what watchers had seen. The floor a stolen node pins while its etcd is
/// serving is dropped as soon as that etcd is seen past it: a later request gets the cluster's real height.
#[tokio::test]
async fn a_restore_request_from_a_serving_cluster_does_not_pin_an_old_revision_floor() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    etcd.put_keys(20).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let mut agents = Vec::new();
    for member in etcd.members() {
        let creds = coordinator.issue_agent_credentials("prod", member.name()).await?;
        agents.push((creds.clone(), crate::fixtures::Agent::start(&coordinator, &creds, member.client_url())?));
    }
    coordinator.wait_agents_connected("prod", &["m1", "m2", "m3"], BACKUP_TIMEOUT).await?;
    backup_ok(&coordinator, "prod").await?;
    let floor = |answers: &[AdminResponse]| match answers.first() {
        Some(AdminResponse::RestoreFrom { highest_revision: Some(seen), .. }) => Ok(seen.revision),
        other => anyhow::bail!("a restore answer with a revision floor expected: {other:?}"),
    };
    let ask = AdminRequest::Restore { cluster: None, backup: "latest".into() };
    let pinned = floor(&agent_request(&coordinator, &agents[2].0, &ask).await?)?;

    // The cluster goes on serving; its agents report it (every 10 s).
    let now = etcd.put_keys(200).await?;
    anyhow::ensure!(now > pinned, "etcd moved on: {now} > {pinned}");
    poll_until(
        "the agents to report the new revision",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let agents = coordinator.connected_agents("prod").await?;
            Ok(agents.iter().any(|a| a["spec"]["revision"].as_i64().is_some_and(|r| r >= now)).then_some(()))
        },
    )
    .await?;
    let later = floor(&agent_request(&coordinator, &agents[0].0, &ask).await?)?;
    assert!(
        later >= now,
        "a request after the cluster moved on plans from {later}, not the pinned {pinned} (now {now})"
    );
    Ok(())
}
