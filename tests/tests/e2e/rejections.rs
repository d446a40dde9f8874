//! Requests the coordinator or `ferryctl` must turn down, with a non-zero exit and a one-line
//! `error: ...` that says why.

use crate::fixtures::{manual_backup_yaml, unix_now, Agent, Coordinator, CoordinatorOptions, CtlOutput, EtcdCluster};

const CLUSTER: &str = "prod";

/// A coordinator with `CLUSTER` registered (a one-member etcd and its agent), so that a rejection is about
/// the request itself and not about an unknown cluster.
async fn coordinator_with_cluster() -> anyhow::Result<(EtcdCluster, Coordinator, Vec<Agent>)> {
    let etcd = EtcdCluster::start(1).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    Ok((etcd, coordinator, agents))
}

/// Asserts `ferryctl` failed with one `error: ...` line on stderr mentioning one of `keywords`
/// (case-insensitive).
#[track_caller]
fn assert_cli_error(out: &CtlOutput, keywords: &[&str]) {
    assert!(!out.success(), "`{}` should have failed; stdout: {}", out.command, out.stdout);
    let stderr = out.stderr.trim();
    assert!(stderr.starts_with("error:"), "`{}`: stderr should start with `error:`: {stderr:?}", out.command);
    assert_eq!(stderr.lines().count(), 1, "`{}`: a one-line error expected: {stderr:?}", out.command);
    let lower = stderr.to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "`{}`: the error should mention one of {keywords:?}: {stderr:?}",
        out.command
    );
}

/// Asserts no manual backup resource was stored for `cluster` (a rejected apply leaves nothing behind).
async fn assert_no_manual_backup_stored(coordinator: &Coordinator, cluster: &str) -> anyhow::Result<()> {
    let out = coordinator.ctl().run(&["get", "EtcdManualBackups.ferry.dev", cluster, "-o", "json"]).await?;
    assert!(!out.success(), "a rejected manual backup must not be stored, found: {}", out.stdout);
    Ok(())
}

#[tokio::test]
async fn manual_backup_outside_one_minute_is_rejected() -> anyhow::Result<()> {
    let (_etcd, coordinator, _agents) = coordinator_with_cluster().await?;
    let now = unix_now();
    // i64::MIN + now: a skew that overflowed to "0 s away" once (issue 26); ± a few seconds of clock between.
    let near_min = (-3..=3).map(|d| ("i64::MIN seconds after now", i64::MIN + now + d));
    for (what, seconds) in [("2 minutes old", now - 120), ("2 minutes ahead", now + 120)].into_iter().chain(near_min) {
        let out = coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, seconds, 0)).await?;
        assert!(!out.success(), "a backupat {what} ({seconds}) must be rejected");
        assert_cli_error(&out, &["minute"]);
    }
    assert_no_manual_backup_stored(&coordinator, CLUSTER).await
}

#[tokio::test]
async fn manual_backup_with_nonzero_nanos_is_rejected() -> anyhow::Result<()> {
    let (_etcd, coordinator, _agents) = coordinator_with_cluster().await?;
    let out = coordinator.ctl().apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 5)).await?;
    assert_cli_error(&out, &["nanos"]);
    assert_no_manual_backup_stored(&coordinator, CLUSTER).await
}

#[tokio::test]
async fn manual_backup_of_never_registered_cluster_is_rejected() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let out = coordinator.ctl().apply_yaml(&manual_backup_yaml("ghost", unix_now(), 0)).await?;
    assert_cli_error(&out, &["never registered", "no agent", "not registered", "unknown cluster"]);
    assert_no_manual_backup_stored(&coordinator, "ghost").await
}

#[tokio::test]
async fn get_of_unknown_resource_type_fails_with_a_clear_error() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let out = coordinator.ctl().run(&["get", "nosuchtype"]).await?;
    assert_cli_error(&out, &["nosuchtype"]);
    assert!(out.stdout.trim().is_empty(), "nothing on stdout for a failed get: {:?}", out.stdout);
    Ok(())
}

#[tokio::test]
async fn apply_of_malformed_yaml_fails_with_a_clear_error() -> anyhow::Result<()> {
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let out = coordinator.ctl().apply_yaml("metadata:\n  type: [EtcdManualBackups.ferry.dev\n  id: : :\n").await?;
    assert_cli_error(&out, &["yaml", "parse"]);
    Ok(())
}

#[tokio::test]
async fn manual_backup_in_the_wrong_namespace_is_rejected_naming_the_right_one() -> anyhow::Result<()> {
    let (_etcd, coordinator, _agents) = coordinator_with_cluster().await?;
    let yaml = manual_backup_yaml(CLUSTER, unix_now(), 0).replace("namespace: ephemeral", "namespace: default");
    let out = coordinator.ctl().apply_yaml(&yaml).await?;
    assert_cli_error(&out, &["lives in namespace \"ephemeral\""]);
    assert_no_manual_backup_stored(&coordinator, CLUSTER).await
}

#[tokio::test]
async fn ferryctl_exits_1_for_refused_input_and_2_when_the_coordinator_fails_or_is_gone() -> anyhow::Result<()> {
    let (_etcd, mut coordinator, _agents) = coordinator_with_cluster().await?;
    let ctl = coordinator.ctl();
    let stale = ctl.apply_yaml(&manual_backup_yaml(CLUSTER, unix_now() - 3600, 0)).await?;
    assert_cli_error(&stale, &["within one minute"]);
    assert_eq!(stale.status.code(), Some(1), "input the coordinator refused: {stale:?}");
    let missing = ctl.run(&["get", "cluster", "nosuch"]).await?;
    assert_eq!(missing.status.code(), Some(1), "not found is the caller's: {missing:?}");
    let bad_flag = ctl.run(&["get", "cluster", "--no-such-flag"]).await?;
    assert_eq!(bad_flag.status.code(), Some(1), "a bad flag is refused input: {bad_flag:?}");

    coordinator.kill();
    let gone = ctl.with_timeout(std::time::Duration::from_secs(30)).run(&["get", "agents"]).await?;
    assert_cli_error(&gone, &["coordinator"]);
    assert_eq!(gone.status.code(), Some(2), "an unreachable coordinator is not the input's fault: {gone:?}");
    Ok(())
}
