//! Revocable, expiring agent credentials, played by an attacker who kept a copy of a node's certificate:
//! - every issued certificate is recorded (`get agentcredentials`) with a bounded life;
//! - a revoked certificate is refused on a new connection and its open connection is closed at once;
//! - re-issuing a member's credentials makes the old certificate stop working;
//! - a gone member's Agent record can be deleted, but not while it is connected;
//! - a read-only admin credential can `get` and nothing else;
//! - admin certificates (the coordinator's own `admin.ferryconfig` included) are recorded, and a revoked one is
//!   refused; revoking the coordinator's own file and restarting it writes a new one;
//! - an agent is sent a renewed certificate over its link before its own expires, saves it and uses it for
//!   its next connection; a revoked certificate is never renewed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use ferry_common::protocol::{JobRequest, RenewAnswer, RenewReply};
use ferry_common::tls::{new_key_and_csr, Identity};

use crate::fixtures::ferry::{manual_backup_yaml, CoordinatorOptions, Ferryctl};
use crate::fixtures::hostile::HostileAgent;
use crate::fixtures::ports::free_port;
use crate::fixtures::{
    assert_daemon_logs_clean, poll_until, unix_now, Agent, Coordinator, EtcdCluster, Stop, STATUS_OK,
};
use crate::observe::http_get;

/// How long the coordinator may take to close a revoked certificate's open connection.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Copies a credentials dir (as an attacker copying a node's files would).
fn steal(creds: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(to)?;
    for f in ["ca.crt", "agent.crt", "agent.key"] {
        std::fs::copy(creds.join(f), to.join(f)).with_context(|| format!("copy {f}"))?;
    }
    Ok(to.to_path_buf())
}

/// The `AgentCredentials` records of `cluster`/`member`, oldest first.
async fn records(coordinator: &Coordinator, cluster: &str, member: &str) -> anyhow::Result<Vec<Value>> {
    let mut rs: Vec<Value> = coordinator
        .ctl()
        .list_json("agentcredentials", None)
        .await?
        .into_iter()
        .filter(|r| r["spec"]["cluster"] == cluster && r["spec"]["member"] == member)
        .collect();
    rs.sort_by_key(|r| (r["spec"]["issuedat"]["seconds"].as_i64(), r["spec"]["issuedat"]["nanos"].as_i64()));
    Ok(rs)
}

#[tokio::test]
async fn agent_credentials_expire_and_are_listed() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("prod", "m1").await?;
    let rs = records(&coordinator, "prod", "m1").await?;
    anyhow::ensure!(rs.len() == 1, "one record: {rs:?}");
    let spec = &rs[0]["spec"];
    let not_after = spec["notafter"]["seconds"].as_i64().context("notafter")?;
    let ninety_days = 90 * 86_400;
    assert!((not_after - unix_now() - ninety_days).abs() < 120, "default life is 90 days: {spec}");
    assert_eq!(spec["revoked"], false);
    assert_eq!(rs[0]["metadata"]["namespace"], "default");
    assert_eq!(rs[0]["metadata"]["id"], spec["serial"]);
    HostileAgent::connect(&coordinator, &creds).await?.close().await;

    // --valid-for sets the life; out-of-bounds values are refused with one line.
    let out = coordinator.dir().join("short");
    let out_s = out.display().to_string();
    let ctl = coordinator.ctl();
    ctl.run(&["agent-credentials", "--cluster", "prod", "--member", "m2", "--out", &out_s, "--valid-for", "2h"])
        .await?
        .ok()?;
    let rs = records(&coordinator, "prod", "m2").await?;
    let not_after = rs[0]["spec"]["notafter"]["seconds"].as_i64().context("notafter")?;
    assert!((not_after - unix_now() - 7200).abs() < 120, "--valid-for 2h: {rs:?}");
    let r = ctl
        .run(&["agent-credentials", "--cluster", "prod", "--member", "m3", "--out", &out_s, "--valid-for", "20000d"])
        .await?;
    assert!(!r.success() && r.stderr.trim().lines().count() == 1 && r.stderr.contains("--valid-for"), "{}", r.stderr);
    let table = ctl.run(&["get", "agentcredentials"]).await?.ok()?;
    assert!(table.stdout.contains("NOT AFTER") && table.stdout.contains("prod"), "{}", table.stdout);
    Ok(())
}

#[tokio::test]
async fn revoked_agent_certificate_is_refused_and_its_connection_closed() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("prod", "m1").await?;
    let stolen = steal(&creds, &coordinator.dir().join("stolen"))?;
    let other = coordinator.issue_agent_credentials("prod", "m2").await?;
    let attacker = HostileAgent::connect(&coordinator, &stolen).await?;
    let bystander = HostileAgent::connect(&coordinator, &other).await?;

    let r =
        coordinator.ctl().run(&["agent-credentials", "revoke", "--cluster", "prod", "--member", "m1"]).await?.ok()?;
    assert!(r.stdout.contains("revoked"), "{}", r.stdout);
    tokio::time::timeout(CLOSE_WITHIN, attacker.closed()).await.context("the revoked link stays open")?;
    assert!(HostileAgent::connect(&coordinator, &stolen).await.is_err(), "a revoked certificate connected");
    assert!(HostileAgent::hold_request_connection(&coordinator, &stolen).await.is_err(), "revoked request link");
    let rs = records(&coordinator, "prod", "m1").await?;
    assert_eq!(rs[0]["spec"]["revoked"], true, "{rs:?}");
    // Another member is unaffected.
    assert!(!bystander.got_a_job_within(Duration::from_millis(100)).await);
    HostileAgent::hold_request_connection(&coordinator, &other).await?.close().await;

    // Revoke by serial.
    let serial =
        records(&coordinator, "prod", "m2").await?[0]["spec"]["serial"].as_str().context("serial")?.to_string();
    coordinator.ctl().run(&["agent-credentials", "revoke", "--serial", &serial]).await?.ok()?;
    tokio::time::timeout(CLOSE_WITHIN, bystander.closed()).await.context("revoked by serial, the link stays open")?;
    assert!(HostileAgent::connect(&coordinator, &other).await.is_err());
    let r = coordinator.ctl().run(&["agent-credentials", "revoke", "--serial", "00ff"]).await?;
    assert!(!r.success() && r.stderr.contains("no agent certificate"), "{}", r.stderr);
    let log = std::fs::read_to_string(coordinator.log_path())?;
    assert!(log.contains("is revoked"), "the refusal is logged");
    Ok(())
}

#[tokio::test]
async fn old_agent_certificate_stops_working_after_reissue() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("prod", "m1").await?;
    let old = steal(&creds, &coordinator.dir().join("old"))?;
    let attacker = HostileAgent::connect(&coordinator, &old).await?;
    // The operator re-issues (overwriting the node's files); the copy the attacker kept dies.
    let new = coordinator.issue_agent_credentials("prod", "m1").await?;
    tokio::time::timeout(CLOSE_WITHIN, attacker.closed()).await.context("the old certificate's link stays open")?;
    assert!(HostileAgent::connect(&coordinator, &old).await.is_err(), "the old certificate still connects");
    HostileAgent::connect(&coordinator, &new).await?.close().await;
    let rs = records(&coordinator, "prod", "m1").await?;
    let revoked: Vec<&Value> = rs.iter().map(|r| &r["spec"]["revoked"]).collect();
    assert_eq!(revoked, [&Value::Bool(true), &Value::Bool(false)], "{rs:?}");
    Ok(())
}

#[tokio::test]
async fn gone_members_agent_record_can_be_deleted_but_not_while_connected() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("prod", "m1").await?;
    let agent = HostileAgent::connect(&coordinator, &creds).await?;
    let ctl = coordinator.ctl();
    crate::fixtures::poll_until("the agent record", Duration::from_secs(10), Duration::from_millis(100), || async {
        Ok(ctl.list_json("agents", None).await?.iter().any(|a| a["spec"]["connected"] == true).then_some(()))
    })
    .await?;
    let r = ctl.run(&["delete", "agent", "prod/m1"]).await?;
    assert!(!r.success(), "deleting a connected agent's record must be refused");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("is connected"), "{}", r.stderr);

    agent.close().await;
    crate::fixtures::poll_until("the agent to go", Duration::from_secs(10), Duration::from_millis(100), || async {
        Ok(ctl.list_json("agents", None).await?.iter().all(|a| a["spec"]["connected"] == false).then_some(()))
    })
    .await?;
    ctl.run(&["delete", "agent", "prod/m1"]).await?.ok()?;
    assert!(ctl.list_json("agents", None).await?.is_empty(), "the record is gone");
    let r = ctl.run(&["delete", "agent", "prod/m1"]).await?;
    assert!(!r.success() && r.stderr.contains("not found"), "{}", r.stderr);
    Ok(())
}

#[tokio::test]
async fn read_only_admin_can_get_and_nothing_else() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials("prod", "m1").await?;
    let file = coordinator.dir().join("readonly.ferryconfig");
    let file_s = file.display().to_string();
    coordinator.ctl().run(&["admin-credentials", "--read-only", "--out", &file_s]).await?.ok()?;
    assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o600);
    let ro = Ferryctl::new(&file);
    assert_eq!(ro.list_json("agentcredentials", None).await?.len(), 1, "get works");
    ro.list_json("clusters", None).await?;

    let manual = manual_backup_yaml("prod", unix_now(), 0);
    let out = coordinator.dir().join("x.db").display().to_string();
    let denied: Vec<Vec<&str>> = vec![
        vec!["delete", "agent", "prod/m1"],
        vec!["delete", "cluster", "prod"],
        vec!["backup", "download", "prod", "latest", "-o", &out],
        vec!["agent-credentials", "--cluster", "prod", "--member", "m9", "--out", &out],
        vec!["agent-credentials", "revoke", "--cluster", "prod", "--member", "m1"],
        vec!["admin-credentials", "--read-only", "--out", &out],
    ];
    for args in &denied {
        let r = ro.run(args).await?;
        assert!(!r.success(), "`{}` must be refused for a read-only admin", r.command);
        let stderr = r.stderr.trim();
        assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
        assert!(stderr.contains("read-only admin credential"), "`{}`: {stderr}", r.command);
    }
    let r = ro.apply_yaml(&manual).await?;
    assert!(!r.success() && r.stderr.contains("read-only admin credential"), "apply: {}", r.stderr);
    // Nothing changed: the agent's credentials are still good.
    HostileAgent::connect(&coordinator, &creds).await?.close().await;
    assert_eq!(records(&coordinator, "prod", "m1").await?[0]["spec"]["revoked"], false);
    Ok(())
}

/// A coordinator with `--metrics-listen` on a fresh port and `extra` flags; the port.
async fn coordinator_with_metrics(extra: &[&str]) -> anyhow::Result<(Coordinator, u16)> {
    let port = free_port();
    let mut options = CoordinatorOptions::default();
    options.extra_args.extend(["--metrics-listen".to_owned(), format!("127.0.0.1:{port}")]);
    options.extra_args.extend(extra.iter().map(|a| (*a).to_owned()));
    Ok((Coordinator::start(options).await?, port))
}

/// The value of the series `name{…}` carrying every label of `labels`, on the coordinator's metrics port.
fn metric(port: u16, name: &str, labels: &[&str]) -> anyhow::Result<Option<f64>> {
    let (_, body) = http_get(port, "/metrics")?;
    Ok(body.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let ours =
            (series == name || series.starts_with(&format!("{name}{{"))) && labels.iter().all(|x| series.contains(x));
        ours.then(|| value.parse().ok()).flatten()
    }))
}

/// Issues credentials for `cluster`/`member` valid for `valid_for` into `DIR/<member>-creds`.
async fn issue(coordinator: &Coordinator, cluster: &str, member: &str, valid_for: &str) -> anyhow::Result<PathBuf> {
    let creds = coordinator.dir().join(format!("{cluster}-{member}-creds"));
    let creds_s = creds.display().to_string();
    let args =
        ["agent-credentials", "--cluster", cluster, "--member", member, "--out", &creds_s, "--valid-for", valid_for];
    coordinator.ctl().run(&args).await?.ok()?;
    Ok(creds)
}

/// The base64 lines of a PEM body (what would show if a key were logged or stored anywhere).
fn pem_body_lines(pem: &str) -> Vec<&str> {
    pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 32).collect()
}

/// Every file under `dir`, as bytes (links not followed).
fn contents_under(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            out.extend(contents_under(&e.path())?);
        } else if t.is_file() {
            out.push((e.path(), std::fs::read(e.path())?));
        }
    }
    Ok(out)
}

/// The record whose `renewedfrom` is `serial`, if any.
fn successor<'a>(rs: &'a [Value], serial: &str) -> Option<&'a Value> {
    rs.iter().find(|r| r["spec"]["renewedfrom"] == serial)
}

#[tokio::test]
async fn agents_renew_two_minute_certificates_by_themselves_and_their_keys_never_leave_the_node() -> anyhow::Result<()>
{
    const MEMBERS: [&str; 2] = ["m1", "m2"];
    // Scheduled backups every 10 s; none may be further apart than this while certificates turn over.
    const MAX_GAP_S: i64 = 40;
    const RUN: Duration = Duration::from_secs(300);
    let etcd = EtcdCluster::start(2).await?;
    let (coordinator, port) = coordinator_with_metrics(&["--min-backup-interval", "10s"]).await?;
    let ctl = coordinator.ctl();
    let mut dirs = Vec::new();
    let mut agents = Vec::new();
    for (i, member) in MEMBERS.iter().enumerate() {
        let creds = issue(&coordinator, "prod", member, "2m").await?;
        agents.push(Agent::start(&coordinator, &creds, etcd.member(i).client_url())?);
        dirs.push(creds);
    }
    coordinator.wait_agents_connected("prod", &MEMBERS, Duration::from_secs(30)).await?;
    let originals: Vec<Value> = {
        let mut v = Vec::new();
        for member in MEMBERS {
            v.push(records(&coordinator, "prod", member).await?[0].clone());
        }
        v
    };
    let expires =
        originals.iter().filter_map(|r| r["spec"]["notafter"]["seconds"].as_i64()).max().context("notafter")?;
    let cluster = "metadata:\n  namespace: default\n  type: Clusters.ferry.dev\n  id: prod\n  labels:\n    \
                   ferry.dev/cluster: prod\nspec:\n  backupconfiguration:\n    interval:\n      seconds: 10\n      \
                   nanos: 0\n";
    ctl.apply_yaml(cluster).await?.ok()?;
    let started = tokio::time::Instant::now();

    // Two renewals of each member, both in use (each used successor revoked its predecessor), and a backup
    // committed after the original certificates expired.
    let agent_logs = || {
        agents
            .iter()
            .map(|a| std::fs::read_to_string(a.log_path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    poll_until("two renewals of each agent, in use", Duration::from_secs(230), Duration::from_secs(2), || async {
        for (member, original) in MEMBERS.iter().zip(&originals) {
            let rs = records(&coordinator, "prod", member).await?;
            let mut serial = original["spec"]["serial"].as_str().context("serial")?.to_string();
            for _ in 0..2 {
                match successor(&rs, &serial) {
                    Some(next) if !next["spec"]["firstusedat"].is_null() => {
                        serial = next["spec"]["serial"].as_str().context("serial")?.to_string()
                    }
                    _ => return Ok(None),
                }
            }
        }
        let committed_after_expiry = coordinator
            .backups("prod")
            .await?
            .iter()
            .any(|b| b["spec"]["createdat"]["seconds"].as_i64().is_some_and(|t| t > expires + 5));
        Ok(committed_after_expiry.then_some(()))
    })
    .await
    .with_context(|| format!("agent logs:\n{}", agent_logs()))?;
    // Backups and renewals go on for five minutes (the issue's bound: no pause over 40 s in 5 minutes).
    tokio::time::sleep_until(started + RUN).await;

    // Each member's chain: the original and the first successor revoked as superseded, the newest valid.
    for (member, original) in MEMBERS.iter().zip(&originals) {
        let rs = records(&coordinator, "prod", member).await?;
        let first = successor(&rs, original["spec"]["serial"].as_str().context("serial")?).context("first")?;
        let second = successor(&rs, first["spec"]["serial"].as_str().context("serial")?).context("second")?;
        let by_serial = |s: &Value| rs.iter().find(|r| r["spec"]["serial"] == *s).cloned().unwrap_or_default();
        for (old, new) in [(original, first), (first, second)] {
            let old = by_serial(&old["spec"]["serial"]);
            assert_eq!(old["spec"]["revoked"], true, "{member}: superseded: {old}");
            assert_eq!(old["spec"]["supersededby"], new["spec"]["serial"], "{member}: {old}");
        }
        let life = second["spec"]["notafter"]["seconds"].as_i64().context("notafter")?
            - second["spec"]["issuedat"]["seconds"].as_i64().context("issuedat")?;
        assert!((life - 120).abs() <= 2, "{member}: the same lifetime as the original: {second}");
        // The expiry gauge shows the newest unrevoked certificate.
        let gauge = metric(
            port,
            "ferry_agent_certificate_expiry_timestamp_seconds",
            &[r#"cluster="prod""#, &format!(r#"member="{member}""#)],
        )?
        .context("expiry gauge")?;
        let newest = rs
            .iter()
            .filter(|r| r["spec"]["revoked"] == false)
            .filter_map(|r| r["spec"]["notafter"]["seconds"].as_f64())
            .fold(0.0, f64::max);
        assert_eq!(gauge, newest, "{member}");
    }
    let ca = metric(port, "ferry_ca_certificate_expiry_timestamp_seconds", &[])?;
    assert!(ca.is_some_and(|t| t > unix_now() as f64), "the CA's expiry: {ca:?}");
    assert!(metric(port, "ferry_admin_certificate_expiry_timestamp_seconds", &[])?.is_some(), "admin.ferryconfig");

    // On disk: the `current` link names a 0700 version dir holding 0600 files, and the key in use is one the
    // coordinator never saw: no line of it in its log nor anywhere in its state dir.
    let mut coordinator_files = contents_under(&coordinator.state_dir())?;
    coordinator_files.push((coordinator.log_path().to_path_buf(), std::fs::read(coordinator.log_path())?));
    for creds in &dirs {
        let target = std::fs::read_link(creds.join("current"))?;
        let version = creds.join(&target);
        assert!(target.to_string_lossy().starts_with('v'), "{}", target.display());
        assert_eq!(std::fs::metadata(&version)?.permissions().mode() & 0o777, 0o700);
        for f in ["ca.crt", "agent.crt", "agent.key"] {
            assert_eq!(std::fs::metadata(version.join(f))?.permissions().mode() & 0o777, 0o600, "{f}");
        }
        let key = std::fs::read_to_string(version.join("agent.key"))?;
        let lines = pem_body_lines(&key);
        assert!(!lines.is_empty(), "{key:.40}");
        for (path, bytes) in &coordinator_files {
            let text = String::from_utf8_lossy(bytes);
            assert!(!lines.iter().any(|l| text.contains(l)), "the agent's new key is in {}", path.display());
        }
        let kept: Vec<String> = std::fs::read_dir(creds)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with('v'))
            .collect();
        assert!(kept.len() <= 2, "the in-use version and the previous one are kept: {kept:?}");
    }

    // Scheduled backups never paused: at most MAX_GAP_S between consecutive commits, and since the last one.
    let mut times: Vec<i64> =
        coordinator.backups("prod").await?.iter().filter_map(|b| b["spec"]["createdat"]["seconds"].as_i64()).collect();
    times.sort_unstable();
    times.push(unix_now());
    let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().copied().max().unwrap_or(i64::MAX);
    eprintln!(
        "{} backups over {} s of renewals; longest gap {longest} s; gaps {gaps:?}",
        times.len() - 1,
        times[times.len() - 1] - times[0]
    );
    assert!(longest <= MAX_GAP_S, "backups paused {longest} s: {gaps:?}");
    assert!(times[times.len() - 1] - times[0] >= RUN.as_secs() as i64 - 15, "five minutes of backups: {times:?}");
    assert_daemon_logs_clean(&coordinator, &agents);
    Ok(())
}

#[tokio::test]
async fn a_stolen_predecessor_is_refused_and_counted_and_cannot_renew_nor_revoke_the_successor() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (coordinator, port) = coordinator_with_metrics(&[]).await?;
    let ctl = coordinator.ctl();
    // The shortest life allowed: renewal is due after two thirds of it (40 s).
    let creds = issue(&coordinator, "prod", "m1", "1m").await?;
    let stolen = steal(&creds, &coordinator.dir().join("stolen"))?;
    let mut agent = Agent::start(&coordinator, &creds, etcd.member(0).client_url())?;
    coordinator.wait_agents_connected("prod", &["m1"], Duration::from_secs(30)).await?;
    // A hostile agent of another cluster, due for renewal at the same time, asks for the real agent's identity.
    let liar_creds = issue(&coordinator, "qa", "m2", "1m").await?;
    let liar = HostileAgent::connect(&coordinator, &liar_creds).await?;
    let original =
        records(&coordinator, "prod", "m1").await?[0]["spec"]["serial"].as_str().context("serial")?.to_string();

    let mut job = liar.next_job(Duration::from_secs(70)).await?;
    assert!(matches!(job.request, JobRequest::RenewCredentials), "{:?}", job.request);
    let lie = new_key_and_csr(&Identity::Agent { cluster: "prod".into(), member: "m1".into() })?;
    let RenewAnswer::Signed { cert_pem, serial: liar_new, .. } =
        job.answer_renewal(&lie.csr_pem, RenewReply::Saved).await?
    else {
        anyhow::bail!("the liar's signing request was refused");
    };
    assert_eq!(
        Identity::from_pem(&cert_pem)?,
        Identity::Agent { cluster: "qa".into(), member: "m2".into() },
        "a CSR naming prod/m1 yields a certificate for the connection's own identity only"
    );
    let qa = records(&coordinator, "qa", "m2").await?;
    assert!(qa.iter().any(|r| r["spec"]["serial"] == liar_new.as_str()), "recorded as qa/m2: {qa:?}");
    liar.close().await;

    // The real agent renews, reconnects with its successor, and that use revokes the original.
    poll_until(
        "the original certificate to be superseded",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || async {
            let rs = records(&coordinator, "prod", "m1").await?;
            let old = rs.iter().find(|r| r["spec"]["serial"] == original.as_str()).context("original")?;
            Ok((old["spec"]["revoked"] == true).then(|| old["spec"]["supersededby"].clone()))
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", std::fs::read_to_string(agent.log_path()).unwrap_or_default()))?;
    coordinator.wait_agents_connected("prod", &["m1"], Duration::from_secs(30)).await?;
    let before = records(&coordinator, "prod", "m1").await?;
    let successor_serial = successor(&before, &original).context("successor")?["spec"]["serial"].clone();

    // The stolen original: refused, counted once, logged; it gets nothing and revokes nothing.
    assert!(HostileAgent::connect(&coordinator, &stolen).await.is_err(), "the stolen predecessor connected");
    let counted =
        metric(port, "ferry_agent_predecessor_certificate_used_total", &[r#"cluster="prod""#, r#"member="m1""#])?;
    assert_eq!(counted, Some(1.0), "one use of the predecessor counted");
    let log = std::fs::read_to_string(coordinator.log_path())?;
    assert!(log.contains("old copy"), "the refusal is logged as an old copy");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = records(&coordinator, "prod", "m1").await?;
    assert_eq!(after.len(), before.len(), "nothing issued to the stolen certificate: {after:?}");
    let current = after.iter().find(|r| r["spec"]["serial"] == successor_serial).context("successor record")?;
    assert_eq!(current["spec"]["revoked"], false, "the successor stays valid: {current}");

    // The real agent keeps backing up over its renewed certificate.
    coordinator.manual_backup("prod").await?;
    let status = coordinator.wait_backup_status("prod", Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "a backup over the renewed certificate: {status}");
    agent.check_running()?;

    // A revoked member is never renewed: nothing issued, nothing saved.
    ctl.run(&["agent-credentials", "revoke", "--cluster", "prod", "--member", "m1"]).await?.ok()?;
    let n = records(&coordinator, "prod", "m1").await?.len();
    let saved = std::fs::read_link(creds.join("current"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(HostileAgent::connect(&coordinator, &creds).await.is_err(), "a revoked member connected");
    assert_eq!(records(&coordinator, "prod", "m1").await?.len(), n, "nothing issued to a revoked certificate");
    assert_eq!(std::fs::read_link(creds.join("current"))?, saved, "nothing renewed after revocation");
    Ok(())
}

/// The serials of the `AdminCredentials` records, with whether each is read-only and revoked.
async fn admin_records(coordinator: &Coordinator) -> anyhow::Result<Vec<(String, bool, bool)>> {
    let rs = coordinator.ctl().list_json("admincredentials", None).await?;
    rs.iter()
        .map(|r| {
            let s = &r["spec"];
            let serial = s["serial"].as_str().context("serial")?.to_string();
            Ok((serial, s["readonly"] == true, s["revoked"] == true))
        })
        .collect()
}

#[tokio::test]
async fn admin_certificates_are_recorded_and_a_revoked_one_is_refused() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let ctl = coordinator.ctl();
    let own = admin_records(&coordinator).await?;
    anyhow::ensure!(own.len() == 1 && !own[0].1 && !own[0].2, "admin.ferryconfig is recorded: {own:?}");
    let own_serial = own[0].0.clone();

    // A second full admin file and a read-only one: both recorded, both work.
    let (full, ro) = (coordinator.dir().join("second.ferryconfig"), coordinator.dir().join("ro.ferryconfig"));
    let (full_s, ro_s) = (full.display().to_string(), ro.display().to_string());
    let r = ctl.run(&["admin-credentials", "--out", &full_s, "--valid-for", "1h"]).await?.ok()?;
    assert!(r.stdout.contains("wrote admin credentials"), "{}", r.stdout);
    ctl.run(&["admin-credentials", "--read-only", "--out", &ro_s]).await?.ok()?;
    assert_eq!(std::fs::metadata(&full)?.permissions().mode() & 0o777, 0o600);
    let (second, reader) = (Ferryctl::new(&full), Ferryctl::new(&ro));
    second.list_json("clusters", None).await?;
    reader.list_json("clusters", None).await?;
    let rs = admin_records(&coordinator).await?;
    anyhow::ensure!(rs.len() == 3, "three admin records: {rs:?}");
    let second_serial = rs.iter().find(|r| r.0 != own_serial && !r.1).context("the second full record")?.0.clone();
    let ro_serial = rs.iter().find(|r| r.1).context("the read-only record")?.0.clone();
    let table = ctl.run(&["get", "admincredentials"]).await?.ok()?;
    assert!(table.stdout.contains("read-only") && table.stdout.contains("full"), "{}", table.stdout);

    // Revoked: refused at connect, the others unaffected.
    for serial in [&second_serial, &ro_serial] {
        let r = ctl.run(&["admin-credentials", "revoke", "--serial", serial]).await?.ok()?;
        assert!(r.stdout.contains("revoked"), "{}", r.stdout);
    }
    for (name, revoked) in [("second", &second), ("read-only", &reader)] {
        let r = revoked.run(&["get", "clusters"]).await?;
        assert!(!r.success(), "the revoked {name} admin certificate still works");
    }
    ctl.list_json("clusters", None).await?;
    let r = ctl.run(&["admin-credentials", "revoke", "--serial", "00ff"]).await?;
    assert!(!r.success() && r.stderr.contains("no admin certificate"), "{}", r.stderr);
    let log = std::fs::read_to_string(coordinator.log_path())?;
    assert!(log.contains("admin certificate") && log.contains("is revoked"), "the refusal is logged");

    // Rotation of the coordinator's own file: revoke it (its own connection may close before the answer),
    // then restart; the coordinator writes a new one.
    let _ = ctl.run(&["admin-credentials", "revoke", "--serial", &own_serial]).await?;
    assert!(!ctl.run(&["get", "clusters"]).await?.success(), "the revoked admin.ferryconfig still works");
    coordinator.restart(Stop::Term).await?;
    ctl.list_json("clusters", None).await?;
    let rs = admin_records(&coordinator).await?;
    assert!(rs.iter().any(|r| r.0 == own_serial && r.2), "the old one stays revoked: {rs:?}");
    assert_eq!(rs.iter().filter(|r| !r.2).count(), 1, "one valid admin certificate, the new file's: {rs:?}");
    Ok(())
}
