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

use crate::fixtures::ferry::{manual_backup_yaml, CoordinatorOptions, Ferryctl};
use crate::fixtures::hostile::HostileAgent;
use crate::fixtures::{poll_until, unix_now, Agent, Coordinator, EtcdCluster, Stop, STATUS_OK};

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

#[tokio::test]
async fn agent_renews_its_certificate_before_expiry_and_uses_it_for_the_next_connection() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.dir().join("m1-creds");
    let creds_s = creds.display().to_string();
    let ctl = coordinator.ctl();
    // The shortest life allowed: renewal is due after two thirds of it (40 s).
    ctl.run(&["agent-credentials", "--cluster", "prod", "--member", "m1", "--out", &creds_s, "--valid-for", "1m"])
        .await?
        .ok()?;
    let old = steal(&creds, &coordinator.dir().join("old"))?;
    let first_cert = std::fs::read_to_string(creds.join("agent.crt"))?;
    let mut agent = Agent::start(&coordinator, &creds, etcd.member(0).client_url())?;
    coordinator.wait_agents_connected("prod", &["m1"], Duration::from_secs(30)).await?;

    poll_until("the agent to save a renewed certificate", Duration::from_secs(90), Duration::from_millis(500), || {
        let creds = creds.clone();
        let first_cert = first_cert.clone();
        async move { Ok((std::fs::read_to_string(creds.join("agent.crt"))? != first_cert).then_some(())) }
    })
    .await
    .with_context(|| format!("agent log:\n{}", std::fs::read_to_string(agent.log_path()).unwrap_or_default()))?;
    for f in ["ca.crt", "agent.crt", "agent.key"] {
        assert_eq!(std::fs::metadata(creds.join(f))?.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let rs = records(&coordinator, "prod", "m1").await?;
    anyhow::ensure!(rs.len() == 2, "the renewed certificate is recorded: {rs:?}");
    let (old_serial, new_spec) = (rs[0]["spec"]["serial"].as_str().context("serial")?.to_string(), &rs[1]["spec"]);
    let life = new_spec["notafter"]["seconds"].as_i64().context("notafter")?
        - new_spec["issuedat"]["seconds"].as_i64().context("issuedat")?;
    assert!((life - 60).abs() <= 2, "the same lifetime as the old certificate: {new_spec}");
    assert!(rs.iter().all(|r| r["spec"]["revoked"] == false), "the old certificate stays valid: {rs:?}");
    HostileAgent::connect(&coordinator, &old).await?.close().await;

    // Revoking the old certificate closes the agent's link; it comes back with the renewed one and backs up.
    ctl.run(&["agent-credentials", "revoke", "--serial", &old_serial]).await?.ok()?;
    poll_until(
        "the agent to reconnect with its new certificate",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let log = std::fs::read_to_string(agent.log_path())?;
            let back =
                log.contains("using the new certificate") && !coordinator.connected_agents("prod").await?.is_empty();
            Ok(back.then_some(()))
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", std::fs::read_to_string(agent.log_path()).unwrap_or_default()))?;
    coordinator.manual_backup("prod").await?;
    let status = coordinator.wait_backup_status("prod", Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "a backup over the renewed certificate: {status}");

    // A revoked certificate, due for renewal, is refused and gets nothing.
    assert!(HostileAgent::connect(&coordinator, &old).await.is_err(), "a revoked certificate connected");
    agent.check_running()?;
    ctl.run(&["agent-credentials", "revoke", "--cluster", "prod", "--member", "m1"]).await?.ok()?;
    let n = records(&coordinator, "prod", "m1").await?.len();
    let saved = std::fs::read_to_string(creds.join("agent.crt"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(HostileAgent::connect(&coordinator, &creds).await.is_err(), "a revoked member connected");
    assert_eq!(records(&coordinator, "prod", "m1").await?.len(), n, "nothing issued to a revoked certificate");
    assert_eq!(std::fs::read_to_string(creds.join("agent.crt"))?, saved, "nothing renewed after revocation");
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
