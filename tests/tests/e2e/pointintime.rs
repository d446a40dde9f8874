//! Point-in-time recovery (issue 31): the state at any covered revision or time, rebuilt from a full backup
//! and the change log, equals what etcd itself held at that revision — every key, value, create and mod
//! revision, version and lease — and downloads as a plain snapshot etcd's own tool restores; one key's old
//! value comes back without a rollback; points outside the window are refused naming it; a restore's plan
//! says what it would undo; an encrypted log opens only with the identity.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{PutOptions, Txn, TxnOp};
use ferry_common::protocol::{AdminRequest, AdminResponse, PointInTime};

use crate::changelog::{backup, enable, revision, wait_covered, wait_started};
use crate::fixtures::restore::{dump_at, restore_and_dump, KeyState};
use crate::fixtures::{Coordinator, CoordinatorOptions, EtcdCluster, S3Server};

const CLUSTER: &str = "prod";

/// Says where two key spaces differ (first few keys), or `None`.
fn difference(got: &BTreeMap<Vec<u8>, KeyState>, want: &BTreeMap<Vec<u8>, KeyState>) -> Option<String> {
    let mut out = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => out.push(format!("{} missing", String::from_utf8_lossy(k))),
            Some(g) if g != v => out.push(format!(
                "{} differs: rebuilt (create {}, mod {}, version {}, lease {:x}, {} bytes) vs etcd (create {}, mod {}, version {}, lease {:x}, {} bytes)",
                String::from_utf8_lossy(k), g.1, g.2, g.3, g.4, g.0.len(), v.1, v.2, v.3, v.4, v.0.len()
            )),
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("{} should not be there", String::from_utf8_lossy(k)));
    }
    (!out.is_empty()).then(|| out.into_iter().take(5).collect::<Vec<_>>().join("; "))
}

/// `ferryctl backup download CLUSTER <point> -o OUT`, restored with etcdutl alone and compared key by key
/// with what the live cluster held at `expected` (nothing is compacted in these tests).
async fn assert_rebuilt(
    c: &Coordinator,
    etcd: &EtcdCluster,
    dir: &Path,
    label: &str,
    point: &[&str],
    expected: i64,
) -> anyhow::Result<()> {
    let out = dir.join(format!("{label}.db"));
    let out_s = out.display().to_string();
    let mut args = vec!["backup", "download", CLUSTER];
    args.extend_from_slice(point);
    args.extend_from_slice(&["-o", &out_s]);
    let run = c.ctl().with_timeout(Duration::from_secs(180)).run(&args).await?.ok()?;
    assert!(run.stdout.contains(&format!("at revision {expected}")), "{label}: {}", run.stdout);
    let (rev, got) = restore_and_dump(&out).await.with_context(|| format!("{label}: restore {out_s} with etcdutl"))?;
    assert_eq!(rev, expected, "{label}: the snapshot serves revision {rev}");
    let (_, want) = dump_at(&etcd.client_urls(), expected).await?;
    if let Some(d) = difference(&got, &want) {
        panic!("{label} (revision {expected}): the rebuilt state is not etcd's: {d}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_state_at_any_covered_point_is_rebuilt_exactly_from_a_full_backup_and_the_log() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    let s3 = S3Server::start().await?;
    let c = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1", "m2", "m3"], Duration::from_secs(30)).await?;
    enable(&c, CLUSTER).await?;
    wait_started(&c, CLUSTER).await?;
    let dir = crate::fixtures::test_dir("pit")?;
    let mut client = etcd.client().await?;

    for i in 0..10 {
        client.put(format!("/registry/pods/default/a{i}"), format!("v{i}"), None).await?;
    }
    let kept = client.lease_grant(3600, None).await?.id();
    client.put("/registry/leases/kept", "held", Some(PutOptions::new().with_lease(kept))).await?;
    let first = backup(&c, None).await?;

    client.put("/registry/pods/default/new1", "n1", None).await?;
    let after_first = revision(&etcd).await?;
    for i in 0..5 {
        client.put(format!("/registry/pods/default/a{i}"), format!("w{i}"), None).await?;
    }
    let ops: Vec<TxnOp> =
        (0..5).map(|i| TxnOp::put(format!("/registry/configmaps/default/t{i}"), format!("t{i}"), None)).collect();
    client.txn(Txn::new().and_then(ops)).await?;
    let txn = revision(&etcd).await?;
    client.put("/registry/configmaps/default/doomed", "precious", None).await?;
    client.delete("/registry/configmaps/default/doomed", None).await?;
    let deleted = revision(&etcd).await?;
    let later = client.lease_grant(3600, None).await?.id();
    client.put("/registry/leases/later", "held", Some(PutOptions::new().with_lease(later))).await?;
    backup(&c, Some(&first)).await?;
    let second_rev =
        c.backups(CLUSTER).await?.first().context("backups")?["spec"]["revision"].as_i64().context("rev")?;

    client.put("/registry/pods/default/new2", "n2", None).await?;
    client.delete("/registry/pods/default/a7", None).await?;
    let before_pause = revision(&etcd).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mid = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.put("/registry/pods/default/new3", "n3", None).await?;
    let last = revision(&etcd).await?;
    wait_covered(&c, CLUSTER, last).await?;

    // Right after a full backup, inside a transaction's revision, just before a delete, after the second full,
    // at a time, and the newest: each equals etcd's own state at that revision.
    let r = |n: i64| n.to_string();
    assert_rebuilt(&c, &etcd, dir.path(), "after-first", &["--at-revision", &r(after_first)], after_first).await?;
    assert_rebuilt(&c, &etcd, dir.path(), "txn", &["--at-revision", &r(txn)], txn).await?;
    assert_rebuilt(&c, &etcd, dir.path(), "before-delete", &["--at-revision", &r(deleted - 1)], deleted - 1).await?;
    assert_rebuilt(&c, &etcd, dir.path(), "after-second", &["--at-revision", &r(second_rev + 1)], second_rev + 1)
        .await?;
    assert_rebuilt(&c, &etcd, dir.path(), "at-time", &["--at", &mid], before_pause).await?;
    assert_rebuilt(&c, &etcd, dir.path(), "newest", &["--at-revision", &r(last)], last).await?;

    // One key back without a rollback: a deleted key's old value, from the log alone…
    let got = c
        .ctl()
        .run(&["get-key", CLUSTER, "/registry/configmaps/default/doomed", "--at-revision", &r(deleted - 1)])
        .await?
        .ok()?;
    assert_eq!(got.stdout, "precious");
    assert!(got.stderr.contains("found in the change log"), "{}", got.stderr);
    let gone =
        c.ctl().run(&["get-key", CLUSTER, "/registry/configmaps/default/doomed", "--at-revision", &r(last)]).await?;
    assert!(!gone.success() && gone.stderr.contains(&format!("deleted at revision {deleted}")), "{gone:?}");
    // …a key the log never touched, from the full backup…
    let a9 = c.ctl().run(&["get-key", CLUSTER, "/registry/pods/default/a9", "--at-revision", &r(last)]).await?.ok()?;
    assert_eq!(a9.stdout, "v9");
    // …and a subtree as etcd key/value JSON lines.
    let pods = c
        .ctl()
        .with_timeout(Duration::from_secs(120))
        .run(&["get-key", CLUSTER, "/registry/pods/default/", "--prefix", "--at-revision", &r(txn)])
        .await?
        .ok()?;
    let lines: Vec<serde_json::Value> =
        pods.stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("JSON lines")?;
    assert_eq!(lines.len(), 11, "a0..a9 and new1 at the transaction: {}", pods.stdout);
    assert!(lines.iter().all(|l| l["mod_revision"].as_i64().is_some_and(|m| m <= txn)), "{}", pods.stdout);

    // Outside the window: refused, naming it.
    for point in [r(last + 100_000), r(1)] {
        let out = c.ctl().run(&["backup", "download", CLUSTER, "--at-revision", &point, "-o", "/dev/null/x"]).await?;
        assert!(!out.success(), "{out:?}");
        assert!(
            out.stderr.contains("cannot be rebuilt") || out.stderr.contains("outside what the change log"),
            "{out:?}"
        );
        assert!(out.stderr.contains("lineage 0: revisions"), "the window is named: {out:?}");
    }
    let future = humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(3600)).to_string();
    let out = c.ctl().run(&["get-key", CLUSTER, "/x", "--at", &future]).await?;
    assert!(!out.success() && out.stderr.contains("after what the change log"), "{out:?}");

    // A restore's plan: what it would undo, by prefix; without --dry-run it says a live restore is not here.
    let plan = c.ctl().run(&["restore", CLUSTER, "--before-revision", &r(deleted), "--dry-run"]).await?.ok()?;
    assert!(plan.stdout.contains(&format!("to revision {}", deleted - 1)), "{}", plan.stdout);
    let line = |p: &str| plan.stdout.lines().find(|l| l.trim_start().starts_with(p)).map(str::to_owned);
    // After the point: doomed deleted (restored), later + new2 + new3 created (removed), a7 deleted (restored).
    let cm = line("/registry/configmaps/").context("configmaps line")?;
    assert_eq!(cm.split_whitespace().skip(1).collect::<Vec<_>>(), ["1", "0", "0"], "{}", plan.stdout);
    let pods_line = line("/registry/pods/").context("pods line")?;
    assert_eq!(pods_line.split_whitespace().skip(1).collect::<Vec<_>>(), ["1", "0", "2"], "{}", plan.stdout);
    // Without --yes a restore to a point is a dry run too.
    let live = c.ctl().run(&["restore", CLUSTER, "--to-revision", &r(txn)]).await?.ok()?;
    assert!(live.stdout.contains("nothing was restored") && live.stdout.contains("--yes"), "{live:?}");

    // A stolen node, of this cluster or another, can neither plan a point nor read a segment.
    let keys = s3.aws()?.list_keys(crate::fixtures::TEST_BUCKET, &format!("backups/{CLUSTER}/log/")).await?;
    let name = keys.first().context("a stored segment")?.trim_start_matches(&format!("backups/{CLUSTER}/")).to_owned();
    for (cluster, member) in [("evil", "m1"), (CLUSTER, "m9")] {
        let creds = c.issue_agent_credentials(cluster, member).await?;
        for request in [
            AdminRequest::PointInTime { cluster: CLUSTER.into(), at: PointInTime::Latest, through_covered: true },
            AdminRequest::Segment { cluster: CLUSTER.into(), name: name.clone() },
            AdminRequest::DeriveBackup { cluster: CLUSTER.into(), at: PointInTime::Latest },
        ] {
            let asked = crate::fixtures::hostile::agent_request(&c, &creds, &request).await?;
            assert!(
                matches!(asked.as_slice(), [AdminResponse::Error { .. }]),
                "an agent of {cluster} got an answer to {request:?}: {asked:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_log_rebuilds_a_point_only_with_the_identity() -> anyhow::Result<()> {
    use crate::encryption::{age_identity, encrypt_to};
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    let dir = crate::fixtures::test_dir("pit-age")?;
    let (key, recipient) = age_identity(dir.path())?;
    let args = vec!["--identity".to_owned(), key.display().to_string()];
    let c = Coordinator::start_s3(&s3, CoordinatorOptions { extra_args: args, ..CoordinatorOptions::s3(&[]) }).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    c.wait_agents_connected(CLUSTER, &["m1"], Duration::from_secs(30)).await?;
    encrypt_to(&c, &[&recipient]).await?;
    enable(&c, CLUSTER).await?;
    wait_started(&c, CLUSTER).await?;
    backup(&c, None).await?;
    let mut client = etcd.client().await?;
    client.put("/registry/secrets/default/s", "one", None).await?;
    let point = revision(&etcd).await?;
    client.put("/registry/secrets/default/s", "two", None).await?;
    wait_covered(&c, CLUSTER, revision(&etcd).await?).await?;

    let key_s = key.display().to_string();
    let p = point.to_string();
    // The segments open on ferryctl's machine only with the identity.
    let without = c.ctl().run(&["get-key", CLUSTER, "/registry/secrets/default/s", "--at-revision", &p]).await?;
    assert!(!without.success() && without.stderr.contains("--identity"), "{without:?}");
    let with = c
        .ctl()
        .run(&["get-key", CLUSTER, "/registry/secrets/default/s", "--at-revision", &p, "--identity", &key_s])
        .await?
        .ok()?;
    assert_eq!(with.stdout, "one");
    let out = dir.path().join("at.db");
    let out_s = out.display().to_string();
    c.ctl()
        .with_timeout(Duration::from_secs(120))
        .run(&["backup", "download", CLUSTER, "--at-revision", &p, "-o", &out_s, "--identity", &key_s])
        .await?
        .ok()?;
    let (rev, got) = restore_and_dump(&out).await?;
    assert_eq!(rev, point);
    assert_eq!(got.get(b"/registry/secrets/default/s".as_slice()).map(|k| k.0.clone()), Some(b"one".to_vec()));
    // Without it here, the coordinator rebuilds the point with its own identity and sends the snapshot.
    let remote = dir.path().join("remote.db");
    let remote_s = remote.display().to_string();
    let run = c
        .ctl()
        .with_timeout(Duration::from_secs(120))
        .run(&["backup", "download", CLUSTER, "--at-revision", &p, "-o", &remote_s])
        .await?
        .ok()?;
    assert!(run.stdout.contains("rebuilt by the coordinator"), "{}", run.stdout);
    let (rev, got) = restore_and_dump(&remote).await?;
    assert_eq!(rev, point);
    assert_eq!(got.get(b"/registry/secrets/default/s".as_slice()).map(|k| k.0.clone()), Some(b"one".to_vec()));

    // Stored as a derived backup (what a restore to the point restores), it is sealed like the cluster's own:
    // as stored it is an age file, and only the identity opens it back to the state at the point.
    c.ctl()
        .with_timeout(Duration::from_secs(120))
        .run(&["backup", "derive", CLUSTER, "--at-revision", &p])
        .await?
        .ok()?;
    let derived =
        c.backups(CLUSTER).await?.into_iter().find(|b| !b["spec"]["derivedfrom"].is_null()).context("derived")?;
    assert_eq!(derived["spec"]["encryption"]["recipients"][0], recipient.as_str(), "{derived}");
    assert_eq!(derived["spec"]["revision"], point, "{derived}");
    let id = derived["metadata"]["id"].as_str().context("id")?.to_owned();
    let sealed = dir.path().join("derived.age");
    c.download_backup(CLUSTER, &id, &sealed, false).await?;
    assert!(std::fs::read(&sealed)?.starts_with(b"age-encryption.org/v1"), "stored sealed");
    let opened = dir.path().join("derived.db");
    let opened_s = opened.display().to_string();
    c.ctl()
        .run(&["backup", "download", CLUSTER, &id, "-o", &opened_s, "--decompress", "--identity", &key_s])
        .await?
        .ok()?;
    let (rev, got) = restore_and_dump(&opened).await?;
    assert_eq!(rev, point);
    assert_eq!(got.get(b"/registry/secrets/default/s".as_slice()).map(|k| k.0.clone()), Some(b"one".to_vec()));
    Ok(())
}

/// A restore to a point of an encrypted cluster needs the coordinator's identity (it rebuilds the state);
/// without one it is refused before anything happens, saying how to do it instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_to_a_point_of_an_encrypted_log_without_the_coordinators_identity_is_refused() -> anyhow::Result<()> {
    use crate::encryption::{age_identity, encrypt_to};
    let s3 = S3Server::start().await?;
    let etcd = EtcdCluster::start(1).await?;
    let dir = crate::fixtures::test_dir("pit-age-none")?;
    let (_key, recipient) = age_identity(dir.path())?;
    let c = Coordinator::start_s3(&s3, CoordinatorOptions::s3(&[])).await?;
    let _agents = c.start_agents(CLUSTER, &etcd).await?;
    encrypt_to(&c, &[&recipient]).await?;
    enable(&c, CLUSTER).await?;
    wait_started(&c, CLUSTER).await?;
    backup(&c, None).await?;
    etcd.client().await?.put("/registry/secrets/default/s", "one", None).await?;
    let point = revision(&etcd).await?;
    wait_covered(&c, CLUSTER, point).await?;
    let out = c.ctl().run(&["backup", "derive", CLUSTER, "--at-revision", &point.to_string()]).await?;
    assert!(
        !out.success() && out.stderr.contains("no --identity") && out.stderr.contains("--identity FILE"),
        "{out:?}"
    );
    assert!(c.backups(CLUSTER).await?.iter().all(|b| b["spec"]["derivedfrom"].is_null()), "nothing derived");
    Ok(())
}
