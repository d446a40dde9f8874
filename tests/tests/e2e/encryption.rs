//! Encryption at rest end to end: backups sealed with age to the recipients of an `EtcdBackupEncryptionConfigs`
//! resource, in the local store and in S3, restored by `ferry-agent restore --identity`, by the coordinator's
//! own identity (the agent gets the zstd stream inside, never the identity), and by `age -d | zstd -d` and
//! etcd's tool alone; wrong identities and tampered objects refused by name, leaving nothing behind; two
//! recipients, either identity opens; rotation and turning encryption off keep older backups readable; a
//! cluster's own recipients apply to its manual backups without automatic ones. A coordinator holding the
//! identity opens every encrypted backup before it lists it: a hostile agent's junk, wrong snapshot or object
//! sealed to another key is refused at commit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ferry_common::encryption::{parse_recipients, Sealer};
use ferry_common::protocol::{
    expect_frame, write_frame, AdminRequest, AdminResponse, BackupSummary, JobMsg, JobReply, JobRequest, RestoreSource,
    SealedObject, UploadedPart,
};
use ferry_common::resources::Timestamp;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::fixtures::ferry::agent_restore;
use crate::fixtures::hostile::{agent_request, etcd_snapshot, HostileAgent};
use crate::fixtures::s3::{S3Server, TEST_BUCKET};
use crate::fixtures::{
    assert_no_unexpected_errors, assert_same_kvs, expected_test_kvs, restore_and_read, test_dir, zstd_decompress,
    Coordinator, CoordinatorOptions, EtcdCluster, TEST_PREFIX,
};
use crate::least_privilege::sane_facts;
use crate::restore::{as_agent, assert_restore_refused, backup, one_member, peer_url, serve_and_read};
use crate::schedule::set_backup_configuration;

const CLUSTER: &str = "prod";
const KEYS: usize = 400;
/// The start of every age identity's secret line: nothing an agent receives may contain it.
const SECRET_MARK: &str = "AGE-SECRET-KEY-";

/// `ferryctl encryption keygen --out DIR/NAME`: the identity file and the recipient printed alone on stdout.
async fn keygen(coordinator: &Coordinator, dir: &Path, name: &str) -> anyhow::Result<(PathBuf, String)> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    let out = coordinator.ctl().run(&["encryption", "keygen", "--out", &path.display().to_string()]).await?.ok()?;
    let recipient = out.stdout.trim().to_owned();
    anyhow::ensure!(recipient.starts_with("age1") && !recipient.contains('\n'), "stdout: {:?}", out.stdout);
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    anyhow::ensure!(mode == 0o600, "the identity file is {mode:o}, not 600");
    // The format of `age-keygen`: age's own tool derives the same recipient from it.
    let derived = std::process::Command::new("age-keygen").arg("-y").arg(&path).output().context("age-keygen -y")?;
    anyhow::ensure!(derived.status.success(), "age-keygen -y: {}", String::from_utf8_lossy(&derived.stderr));
    anyhow::ensure!(String::from_utf8_lossy(&derived.stdout).trim() == recipient, "age-keygen -y disagrees");
    Ok((path, recipient))
}

/// An identity made with age's own tool in `dir/coordinator-key.txt` (0600), for a coordinator's `--identity`;
/// its path and recipient.
pub(crate) fn age_identity(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join("coordinator-key.txt");
    let made = std::process::Command::new("age-keygen").arg("-o").arg(&key).output().context("age-keygen")?;
    anyhow::ensure!(made.status.success(), "age-keygen: {}", String::from_utf8_lossy(&made.stderr));
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let derived = std::process::Command::new("age-keygen").arg("-y").arg(&key).output().context("age-keygen -y")?;
    let recipient = String::from_utf8(derived.stdout)?.trim().to_owned();
    Ok((key, recipient))
}

/// Applies the cluster-wide encryption config with `recipients` (empty: backups unencrypted).
pub(crate) async fn encrypt_to(coordinator: &Coordinator, recipients: &[&str]) -> anyhow::Result<()> {
    let list: Vec<String> = recipients.iter().map(|r| format!("\"{r}\"")).collect();
    let yaml = format!(
        "metadata:\n  namespace: default\n  type: EtcdBackupEncryptionConfigs.ferry.dev\n  id: etcd-backup-encryption\n\
         spec:\n  recipients: [{}]\n",
        list.join(", ")
    );
    coordinator.ctl().apply_yaml(&yaml).await?.ok()?;
    Ok(())
}

/// The recipients a backup spec says it is encrypted to; empty when it is not encrypted.
fn recipients_of(spec: &Value) -> Vec<String> {
    spec["encryption"]["recipients"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Opens a stored object with Debian's `age` and `zstd` alone, restores it with etcd's tool and checks every
/// test key is back.
async fn assert_age_alone_restores(object: &Path, identity: &Path, dir: &Path) -> anyhow::Result<()> {
    let zst = dir.join(format!("{}.zst", identity.file_name().and_then(|n| n.to_str()).unwrap_or("x")));
    let out = tokio::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg("-o")
        .arg(&zst)
        .arg(object)
        .output()
        .await
        .context("run age -d (apt-get install age)")?;
    anyhow::ensure!(out.status.success(), "age -d failed: {}", String::from_utf8_lossy(&out.stderr));
    let snapshot = zst.with_extension("db");
    zstd_decompress(&zst, &snapshot).await?;
    let restored = restore_and_read(&snapshot).await?;
    let ours = restored.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
    assert_same_kvs(&expected_test_kvs(KEYS), &ours, "keys restored with age -d | zstd -d | etcdutl");
    Ok(())
}

/// `ferry-agent restore` of `id` into a fresh data dir with `extra` flags; on success serves it and checks
/// every key is back.
async fn agent_restores(
    coordinator: &Coordinator,
    creds: &Path,
    id: &str,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<crate::fixtures::CtlOutput> {
    let data_dir = dir.join(format!("{name}.etcd"));
    let (port, peer) = peer_url();
    let mut args = [as_agent(coordinator, creds), one_member(id, &data_dir, &peer)].concat();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let out = agent_restore(&args).await?;
    if out.success() {
        let kvs = serve_and_read(&data_dir, port, &dir.join(format!("{name}.log"))).await?;
        assert_same_kvs(&expected_test_kvs(KEYS), &kvs, &format!("keys after `ferry-agent restore` ({name})"));
    } else {
        assert!(!data_dir.exists(), "a refused restore ({name}) left {}", data_dir.display());
    }
    Ok(out)
}

#[tokio::test]
async fn local_store_backups_are_encrypted_and_restore_with_either_identity_or_age_alone() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(KEYS).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let dir = test_dir("encryption-local")?;
    let (key_a, a) = keygen(&coordinator, dir.path(), "a.txt").await?;
    let (key_b, b) = keygen(&coordinator, dir.path(), "b.txt").await?;
    let (key_c, c) = keygen(&coordinator, dir.path(), "c.txt").await?;

    // Bad recipients are refused at apply, and nothing is stored.
    let bad = coordinator
        .ctl()
        .apply_yaml(
            "metadata: {type: EtcdBackupEncryptionConfigs.ferry.dev, id: etcd-backup-encryption}\nspec: {recipients: [age1nope]}\n",
        )
        .await?;
    assert!(!bad.success() && bad.stderr.contains("not an age X25519 recipient"), "{}", bad.stderr);

    // Two recipients: a working key and one kept in a safe.
    encrypt_to(&coordinator, &[&a, &b]).await?;
    let (id, spec) = backup(&coordinator, CLUSTER).await?;
    assert_eq!(recipients_of(&spec), [a.clone(), b.clone()], "the manifest names its recipients: {spec:#}");
    let object = coordinator.store_dir().join(CLUSTER).join(format!("{id}.snapshot.zst"));
    let stored = std::fs::read(&object)?;
    assert!(stored.starts_with(b"age-encryption.org/v1\n"), "the stored object is an age file");
    assert_eq!(spec["size"].as_u64(), Some(stored.len() as u64), "spec.size is the stored (encrypted) object's");
    assert!(spec["encryption"]["zstdsha256"].as_str().is_some_and(|s| s.len() == 64), "{spec:#}");

    // Standard tools alone, with either identity.
    assert_age_alone_restores(&object, &key_a, dir.path()).await?;
    assert_age_alone_restores(&object, &key_b, dir.path()).await?;

    // ferry-agent restore --identity, and the refusals: no identity, a wrong one, a tampered object.
    // A restorer's own certificate: issuing one for m1 would revoke the running agent's.
    let creds = coordinator.issue_agent_credentials(CLUSTER, "restorer").await?;
    let a_flag = ["--identity", key_a.to_str().context("path")?];
    agent_restores(&coordinator, &creds, &id, dir.path(), "with-a", &a_flag).await?.ok()?;
    let out = agent_restores(&coordinator, &creds, &id, dir.path(), "without", &[]).await?;
    assert_restore_refused(&out, &["--identity"]);
    assert!(out.stderr.contains(&a) && out.stderr.contains(&b), "the refusal names the recipients: {}", out.stderr);
    let c_flag = ["--identity", key_c.to_str().context("path")?];
    let out = agent_restores(&coordinator, &creds, &id, dir.path(), "with-c", &c_flag).await?;
    assert_restore_refused(&out, &["wrong identity"]);
    let mut tampered = stored.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    std::fs::write(&object, &tampered)?;
    let out = agent_restores(&coordinator, &creds, &id, dir.path(), "tampered", &a_flag).await?;
    assert_restore_refused(&out, &["tampered", "corrupted"]);
    let out = coordinator
        .ctl()
        .run(&["backup", "verify", CLUSTER, &id, "--identity", key_a.to_str().context("path")?])
        .await?;
    assert_restore_refused(&out, &["tampered", "corrupted"]);
    std::fs::write(&object, &stored)?;

    // ferryctl: verify and download with the identity; without --decompress the object as stored.
    let key_b_str = key_b.to_str().context("path")?;
    let out = coordinator.ctl().run(&["backup", "verify", CLUSTER, &id, "--identity", key_b_str]).await?.ok()?;
    assert!(out.stdout.contains(&format!("keys:      {}", etcd.read_prefix("").await?.len())), "{}", out.stdout);
    let plain = dir.path().join("download.db");
    let plain_str = plain.display().to_string();
    coordinator
        .ctl()
        .run(&["backup", "download", CLUSTER, &id, "-o", &plain_str, "--decompress", "--identity", key_b_str])
        .await?
        .ok()?;
    assert_eq!(spec["rawsize"].as_u64(), Some(std::fs::metadata(&plain)?.len()), "the decrypted snapshot");
    let out = coordinator
        .ctl()
        .run(&[
            "backup",
            "download",
            CLUSTER,
            &id,
            "-o",
            &dir.path().join("x.db").display().to_string(),
            "--decompress",
        ])
        .await?;
    assert_restore_refused(&out, &["--identity"]);
    assert!(!dir.path().join("x.db").exists(), "a refused download wrote a file");

    // Rotation: new backups go to the new recipient only; the old one still opens with its identities.
    encrypt_to(&coordinator, &[&c]).await?;
    let (rotated, rotated_spec) = backup(&coordinator, CLUSTER).await?;
    assert_eq!(recipients_of(&rotated_spec), [c.as_str()]);
    let out = agent_restores(&coordinator, &creds, &rotated, dir.path(), "rotated-a", &a_flag).await?;
    assert_restore_refused(&out, &["wrong identity"]);
    agent_restores(&coordinator, &creds, &rotated, dir.path(), "rotated-c", &c_flag).await?.ok()?;
    agent_restores(&coordinator, &creds, &id, dir.path(), "old-after-rotation", &a_flag).await?.ok()?;

    // Turning encryption off: plain zstd again, older encrypted backups unchanged and readable.
    encrypt_to(&coordinator, &[]).await?;
    let (plain_id, plain_spec) = backup(&coordinator, CLUSTER).await?;
    assert!(plain_spec["encryption"].is_null(), "{plain_spec:#}");
    agent_restores(&coordinator, &creds, &plain_id, dir.path(), "plain", &[]).await?.ok()?;
    assert_age_alone_restores(&object, &key_a, dir.path()).await?;

    // The cluster's own recipients without automatic backups (manual backups only): accepted, and its manual
    // backups are sealed to them while the cluster-wide config has none. An empty configuration still is not.
    set_backup_configuration(&coordinator, CLUSTER, json!({"encryption": {"recipients": [c]}})).await?.ok()?;
    let (own_id, own_spec) = backup(&coordinator, CLUSTER).await?;
    assert_eq!(recipients_of(&own_spec), [c.as_str()], "{own_spec:#}");
    let own = coordinator.store_dir().join(CLUSTER).join(format!("{own_id}.snapshot.zst"));
    assert_age_alone_restores(&own, &key_c, dir.path()).await?;
    let out = set_backup_configuration(&coordinator, CLUSTER, json!({})).await?;
    assert!(!out.success() && out.stderr.contains("backupconfiguration is empty"), "{}", out.stderr);
    assert_no_unexpected_errors(coordinator.log_path(), &["tampered", "wrong identity"]);
    Ok(())
}

#[tokio::test]
async fn s3_backups_restore_through_the_coordinators_identity_which_no_agent_ever_receives() -> anyhow::Result<()> {
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(KEYS).await?;
    let dir = test_dir("encryption-s3")?;
    // An identity made with age's own tool, held by the coordinator.
    let (key, recipient) = age_identity(dir.path())?;
    let secret = std::fs::read_to_string(&key)?
        .lines()
        .find(|l| l.starts_with(SECRET_MARK))
        .context("the identity line")?
        .to_owned();

    let key_str = key.display().to_string();
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&["--identity", &key_str])).await?;
    let agents = coordinator.start_agents_with_env(CLUSTER, &etcd, &[("RUST_LOG", "debug")]).await?;
    encrypt_to(&coordinator, &[&recipient]).await?;
    let (id, spec) = backup(&coordinator, CLUSTER).await?;
    assert_eq!(recipients_of(&spec), [recipient.as_str()]);

    // The S3 object is an age file the standard tools open.
    let object = dir.path().join("object.age");
    s3.aws()?.download(TEST_BUCKET, spec["snapshot"].as_str().context("spec.snapshot")?, &object).await?;
    assert!(std::fs::read(&object)?.starts_with(b"age-encryption.org/v1\n"), "the S3 object is an age file");
    assert_age_alone_restores(&object, &key, dir.path()).await?;

    // A restore without --identity: the coordinator opens the backup and streams the zstd inside.
    let creds = coordinator.issue_agent_credentials(CLUSTER, "restorer").await?;
    let out = agent_restores(&coordinator, &creds, &id, dir.path(), "by-coordinator", &[]).await?.ok()?;
    assert!(out.stderr.contains("the coordinator opens the encrypted backup"), "{}", out.stderr);
    // With the identity on the agent too (the presigned S3 path is not used then: the coordinator opens it).
    agent_restores(&coordinator, &creds, &id, dir.path(), "with-identity", &["--identity", &key_str]).await?.ok()?;

    // What an agent certificate is sent for a restore: the zstd stream, the manifest, no identity.
    let answers =
        agent_request(&coordinator, &creds, &AdminRequest::Restore { cluster: None, backup: id.clone() }).await?;
    assert!(
        matches!(answers.first(), Some(AdminResponse::RestoreFrom { source: RestoreSource::Decrypted, .. })),
        "the coordinator says it decrypted: {:?}",
        answers.first()
    );
    let mut data = Vec::new();
    for a in &answers {
        match a {
            AdminResponse::Data(d) => data.extend_from_slice(d),
            other => {
                let shown = format!("{other:?}");
                assert!(!shown.contains(SECRET_MARK) && !shown.contains(&secret), "a frame holds the identity");
            }
        }
    }
    assert!(matches!(answers.last(), Some(AdminResponse::DownloadEnd)), "{:?}", answers.last());
    assert!(data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "the agent got the zstd stream, not the age file");
    let needle = SECRET_MARK.as_bytes();
    assert!(!data.windows(needle.len()).any(|w| w == needle), "the data frames hold no identity");

    // Nothing an agent logged (debug level: every job it got) holds an identity.
    for agent in &agents {
        let log = std::fs::read_to_string(agent.log_path())?;
        assert!(!log.contains(SECRET_MARK), "the agent's log holds an identity: {}", agent.log_path().display());
    }
    assert!(!std::fs::read_to_string(coordinator.log_path())?.contains(SECRET_MARK), "the coordinator logged it");
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

/// How long a hostile backup job may take to be sent, answered and recorded.
const HOSTILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Plays a hostile agent of "evil" for one manual backup: seals `zstd` to `to` and describes it as that zstd
/// stream (its true size and sha256) of the snapshot `raw`, so only what is inside can give it away. Returns
/// the recipients the job asked for and the coordinator's verdict.
async fn hostile_sealed_backup(
    coordinator: &Coordinator,
    evil: &HostileAgent,
    zstd: &[u8],
    raw: &[u8],
    to: &str,
) -> anyhow::Result<(Vec<String>, JobReply)> {
    let object = seal(&[to], zstd)?;
    hostile_object_backup(coordinator, evil, &object, zstd, raw).await
}

/// A stolen node of cluster "evil", connected and reporting, whose cluster seals its backups to `recipient`.
async fn hostile_sealing_member(coordinator: &Coordinator, recipient: &str) -> anyhow::Result<HostileAgent> {
    let creds = coordinator.issue_agent_credentials("evil", "m1").await?;
    let mut evil = HostileAgent::connect(coordinator, &creds).await?;
    evil.report(sane_facts(1)).await?;
    coordinator.wait_agents_connected("evil", &["m1"], HOSTILE_TIMEOUT).await?;
    set_backup_configuration(coordinator, "evil", json!({"encryption": {"recipients": [recipient]}})).await?.ok()?;
    Ok(evil)
}

/// `zstd` sealed with age to `to`.
fn seal(to: &[&str], zstd: &[u8]) -> anyhow::Result<Vec<u8>> {
    let recipients: Vec<String> = to.iter().map(|r| (*r).to_owned()).collect();
    let mut sealer = Sealer::new(&parse_recipients(&recipients)?)?;
    let mut object = Vec::new();
    for piece in zstd.chunks(256 * 1024) {
        object.extend(sealer.seal(piece)?);
    }
    object.extend(sealer.finish()?.0);
    Ok(object)
}

/// Plays a hostile agent of "evil" that stores `object` as the encrypted backup of `zstd` (of `raw`).
async fn hostile_object_backup(
    coordinator: &Coordinator,
    evil: &HostileAgent,
    object: &[u8],
    zstd: &[u8],
    raw: &[u8],
) -> anyhow::Result<(Vec<String>, JobReply)> {
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(HOSTILE_TIMEOUT).await?;
    let JobRequest::Backup(request) = &job.request else { anyhow::bail!("not a backup job: {:?}", job.request) };
    let recipients = request.recipients.clone();
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    for piece in object.chunks(256 * 1024) {
        write_frame(&mut job.send, &JobMsg::Data(piece.to_vec())).await?;
    }
    let summary = BackupSummary {
        raw_size: raw.len() as u64,
        raw_sha256: Sha256::digest(raw).into(),
        compressed_size: zstd.len() as u64,
        compressed_sha256: Sha256::digest(zstd).into(),
        zstd_level: 3,
        started_at: Timestamp::now(),
        finished_at: Timestamp::now(),
        parts: Vec::new(),
        sealed: Some(SealedObject { size: object.len() as u64, sha256: Sha256::digest(object).into() }),
    };
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    Ok((recipients, expect_frame(&mut job.recv).await?))
}

/// Issue 26, finding 7: the member that seals could sidestep encryption. Without a coordinator identity an
/// age header followed by the plain zstd stream was committed as encrypted; a member could add its own
/// recipient unseen. The coordinator now reads the age header without a key: one X25519 stanza per
/// configured recipient, and exactly the size age gives the declared zstd stream.
#[tokio::test]
async fn a_member_cannot_skip_the_encryption_or_add_its_own_recipient() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let recipient = ferry_common::encryption::keygen().recipient;
    let own = ferry_common::encryption::keygen().recipient;
    let evil = hostile_sealing_member(&coordinator, &recipient).await?;
    let snapshot = etcd_snapshot(etcd.member(0).client_url()).await?;
    let zstd = zstd::encode_all(&snapshot[..], 3)?;

    // An age header (of a real sealing to the recipient) in front of the plain zstd stream.
    let sealed = seal(&[&recipient], &zstd)?;
    let header = ferry_common::encryption::AgeHeader::parse(&sealed)?;
    let mut plain_behind = sealed[..header.len].to_vec();
    plain_behind.extend_from_slice(&zstd);
    let two = seal(&[&recipient, &own], &zstd)?;
    let cases: [(&str, &[u8], &str); 2] = [
        ("the plain snapshot behind an age header", &plain_behind, "not the size age gives"),
        ("sealed to the cluster's recipient and the member's own", &two, "different number of recipients"),
    ];
    let mut previous: Option<Value> = None;
    for (what, object, refusal) in cases {
        let (_, reply) = hostile_object_backup(&coordinator, &evil, object, &zstd, &snapshot).await?;
        assert!(matches!(reply, JobReply::Failed { .. }), "{what} was committed: {reply:?}");
        let status = match &previous {
            None => coordinator.wait_backup_status("evil", HOSTILE_TIMEOUT).await?,
            Some(p) => coordinator.wait_next_backup_status("evil", p, HOSTILE_TIMEOUT).await?,
        };
        assert!(status["error"].as_str().is_some_and(|e| e.contains(refusal)), "{what}: {status:#}");
        assert!(coordinator.backups("evil").await?.is_empty(), "{what} was listed");
        previous = Some(status);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // Sealed as asked: committed.
    let (_, reply) = hostile_object_backup(&coordinator, &evil, &sealed, &zstd, &snapshot).await?;
    assert!(matches!(reply, JobReply::Committed), "{reply:?}");
    evil.close().await;
    assert_no_unexpected_errors(coordinator.log_path(), &["not the size age gives", "different number of recipients"]);
    Ok(())
}

/// Plays a hostile agent of "evil" (an S3 job) that uploads `object` in one part, with the store's true ETag,
/// as the encrypted backup of `zstd` (of `raw`), every size and hash of it true.
async fn hostile_s3_object_backup(
    coordinator: &Coordinator,
    evil: &HostileAgent,
    object: &[u8],
    zstd: &[u8],
    raw: &[u8],
) -> anyhow::Result<JobReply> {
    coordinator.manual_backup("evil").await?;
    let mut job = evil.next_job(HOSTILE_TIMEOUT).await?;
    write_frame(&mut job.send, &JobMsg::Started(sane_facts(1))).await?;
    let etag = job.upload_part(1, object, object).await?;
    let summary = BackupSummary {
        raw_size: raw.len() as u64,
        raw_sha256: Sha256::digest(raw).into(),
        compressed_size: zstd.len() as u64,
        compressed_sha256: Sha256::digest(zstd).into(),
        zstd_level: 3,
        started_at: Timestamp::now(),
        finished_at: Timestamp::now(),
        parts: vec![UploadedPart { number: 1, etag }],
        sealed: Some(SealedObject { size: object.len() as u64, sha256: Sha256::digest(object).into() }),
    };
    write_frame(&mut job.send, &JobMsg::Finished(summary)).await?;
    Ok(expect_frame(&mut job.recv).await?)
}

/// Issue 29: an S3 upload verified by its parts (the default) is not read back, so its first bytes carry
/// the encryption check. Where the cluster's backups must be encrypted, a member that uploads the plain zstd
/// stream (saying it sealed it), or seals it to its own recipient too, gets nothing recorded; sealed as
/// asked, its backup is committed.
#[tokio::test]
async fn s3_uploads_verified_by_their_parts_must_be_sealed_to_exactly_the_clusters_recipients() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let s3 = S3Server::start().await?;
    let coordinator = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let recipient = ferry_common::encryption::keygen().recipient;
    let own = ferry_common::encryption::keygen().recipient;
    let evil = hostile_sealing_member(&coordinator, &recipient).await?;
    let snapshot = etcd_snapshot(etcd.member(0).client_url()).await?;
    let zstd = zstd::encode_all(&snapshot[..], 3)?;
    let two = seal(&[&recipient, &own], &zstd)?;
    let cases: [(&str, &[u8], &str); 2] = [
        ("the plain zstd stream", &zstd, "plain zstd (not encrypted)"),
        ("sealed to the cluster's recipient and the member's own", &two, "different number of recipients"),
    ];
    let mut previous: Option<Value> = None;
    for (what, object, refusal) in cases {
        let reply = hostile_s3_object_backup(&coordinator, &evil, object, &zstd, &snapshot).await?;
        assert!(matches!(reply, JobReply::Failed { .. }), "{what} was committed: {reply:?}");
        let status = match &previous {
            None => coordinator.wait_backup_status("evil", HOSTILE_TIMEOUT).await?,
            Some(p) => coordinator.wait_next_backup_status("evil", p, HOSTILE_TIMEOUT).await?,
        };
        assert!(status["error"].as_str().is_some_and(|e| e.contains(refusal)), "{what}: {status:#}");
        assert!(coordinator.backups("evil").await?.is_empty(), "{what} was listed");
        previous = Some(status);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let keys = s3.aws()?.list_keys(TEST_BUCKET, "").await?;
    assert!(keys.is_empty(), "the refused objects were deleted: {keys:?}");
    // Sealed as asked: committed, verified by its parts.
    let sealed = seal(&[&recipient], &zstd)?;
    let reply = hostile_s3_object_backup(&coordinator, &evil, &sealed, &zstd, &snapshot).await?;
    assert!(matches!(reply, JobReply::Committed), "{reply:?}");
    let listed = coordinator.backups("evil").await?;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["metadata"]["annotations"]["ferry.dev/verification"], "parts", "{:#}", listed[0]);
    assert_eq!(listed[0]["spec"]["sha256"], hex::encode(Sha256::digest(&sealed)), "the stored object's sha256");
    assert!(s3.leftover_uploads().is_empty(), "unfinished uploads: {:?}", s3.leftover_uploads());
    evil.close().await;
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn a_coordinator_holding_the_identity_refuses_junk_a_wrong_snapshot_or_another_key_at_commit(
) -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let dir = test_dir("encryption-commit")?;
    let key = dir.path().join("coordinator-key.txt");
    let made = ferry_common::encryption::keygen();
    std::io::Write::write_all(&mut ferry_common::config::create_private(&key)?, made.file_text.as_bytes())?;
    let recipient = made.recipient;
    let stranger = ferry_common::encryption::keygen().recipient;
    let options = CoordinatorOptions {
        extra_args: vec!["--identity".into(), key.display().to_string()],
        ..CoordinatorOptions::default()
    };
    let coordinator = Coordinator::start(options).await?;

    // A stolen node of "evil", whose cluster has its own recipient and no automatic backups.
    let evil = hostile_sealing_member(&coordinator, &recipient).await?;

    let snapshot = etcd_snapshot(etcd.member(0).client_url()).await?;
    let zstd = zstd::encode_all(&snapshot[..], 3)?;
    etcd.put_keys(80).await?;
    let other = zstd::encode_all(&etcd_snapshot(etcd.member(0).client_url()).await?[..], 3)?;
    let junk: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let cases: [(&str, &[u8], &str, &str); 3] = [
        ("junk sealed to the recipient", &junk, &recipient, "does not decompress"),
        ("another snapshot sealed to the recipient", &other, &recipient, "decompressed snapshot"),
        ("the snapshot sealed to another key", &zstd, &stranger, "not encrypted to the backup's recipients"),
    ];
    // The snapshot it describes, sealed to the recipient: opened, checked whole, listed. First: three refusals
    // in a row take the member out of rotation (issue 26), so the honest commit cannot come after them.
    let (_, reply) = hostile_sealed_backup(&coordinator, &evil, &zstd, &snapshot, &recipient).await?;
    assert!(matches!(reply, JobReply::Committed), "{reply:?}");
    let backups = coordinator.backups("evil").await?;
    assert_eq!(backups.len(), 1);
    assert_eq!(recipients_of(&backups[0]["spec"]), [recipient.as_str()]);
    let stored_before = std::fs::read_dir(coordinator.store_dir().join("evil"))?.count();
    let mut previous = coordinator.wait_backup_status("evil", HOSTILE_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (what, sealed, to, refusal) in cases {
        let (asked, reply) = hostile_sealed_backup(&coordinator, &evil, sealed, &snapshot, to).await?;
        assert_eq!(asked, [recipient.as_str()], "the cluster's own recipient is in its manual backup's job");
        // Refused, and the agent is not told why (that would teach it what to send): the status is.
        assert!(matches!(&reply, JobReply::Failed { error } if !error.contains(refusal)), "{what}: {reply:?}");
        let status = coordinator.wait_next_backup_status("evil", &previous, HOSTILE_TIMEOUT).await?;
        assert!(status["error"].as_str().is_some_and(|e| e.contains(refusal)), "{what}: {status:#}");
        assert_eq!(coordinator.backups("evil").await?.len(), 1, "{what} was listed");
        previous = status;
        // Manual backups are named by the second they are asked for.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let stored = std::fs::read_dir(coordinator.store_dir().join("evil"))?.count();
    assert_eq!(stored, stored_before, "the refused backups left something behind");
    evil.close().await;
    assert_no_unexpected_errors(
        coordinator.log_path(),
        &["does not decompress", "decompressed snapshot", "not encrypted to the backup's recipients"],
    );
    Ok(())
}
