//! Operating Ferry: live `/metrics` of both daemons pass `promtool check metrics`, the health endpoints
//! answer, and a real Prometheus server, run with the shipped scrape config and alert rules, reads the last
//! backup time back.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::fixtures::ferry::STATUS_OK;
use crate::fixtures::ports::free_port;
use crate::fixtures::process::Daemon;
use crate::fixtures::{poll_until, test_dir, Agent, Coordinator, CoordinatorOptions, EtcdCluster, Stop};

const CLUSTER: &str = "observed";

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub(crate) fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    // Prometheus and axum may answer chunked; undo that for the small bodies read here.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn promtool_check_metrics(text: &str) -> anyhow::Result<()> {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool (Debian package prometheus; .ci/run installs it)")?;
    child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn prometheus_reads_the_last_backup_time_and_promtool_accepts_live_metrics() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(200).await?;
    let (coord_port, agent_port, prom_port) = (free_port(), free_port(), free_port());
    let coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{coord_port}")],
        ..Default::default()
    })
    .await?;
    let creds = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;
    let listen = format!("127.0.0.1:{agent_port}");
    let _agent =
        Agent::start_with_env(&coordinator, &creds, etcd.member(0).client_url(), &[("FERRY_METRICS_LISTEN", &listen)])?;
    coordinator.wait_agents_connected(CLUSTER, &["m1"], Duration::from_secs(30)).await?;

    for port in [coord_port, agent_port] {
        poll_until(&format!("/readyz on {port}"), Duration::from_secs(30), Duration::from_millis(200), || async move {
            Ok((http_get(port, "/readyz")?.0 == 200).then_some(()))
        })
        .await?;
        assert_eq!(http_get(port, "/healthz")?.0, 200);
    }

    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status}");
    let backup_time = status["lastbackuptime"]["seconds"].as_i64().context("lastbackuptime")?;

    let (_, coord_metrics) = http_get(coord_port, "/metrics")?;
    let (_, agent_metrics) = http_get(agent_port, "/metrics")?;
    for (name, text) in [("coordinator", &coord_metrics), ("agent", &agent_metrics)] {
        promtool_check_metrics(text).with_context(|| format!("{name} /metrics:\n{text}"))?;
    }
    for want in [
        format!("ferry_backup_last_success_timestamp_seconds{{cluster=\"{CLUSTER}\"}}"),
        format!("ferry_backups_total{{cluster=\"{CLUSTER}\",result=\"success\"}} 1"),
        format!("ferry_agents_connected{{cluster=\"{CLUSTER}\"}} 1"),
        "ferry_store_configuration_error 0".into(),
        "ferry_backup_duration_seconds_count 1".into(),
    ] {
        assert!(coord_metrics.contains(&want), "coordinator metrics lack {want}:\n{coord_metrics}");
    }
    for want in
        ["ferry_agent_coordinator_connected 1", "ferry_agent_etcd_read_bytes_total ", "process_resident_memory_bytes "]
    {
        assert!(agent_metrics.contains(want), "agent metrics lack {want}:\n{agent_metrics}");
    }

    // The shipped scrape config and rules, pointed at this test's daemons and scraped every second.
    let dir = test_dir("prometheus")?;
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let config = std::fs::read_to_string(shipped.join("prometheus.yml"))?
        .replace("15s", "1s")
        .replace(r#"["ferry-coordinator-metrics.ferry.svc:9464"]"#, &format!(r#"["127.0.0.1:{coord_port}"]"#))
        .replace(
            r#"["cp1.example.com:9465", "cp2.example.com:9465", "cp3.example.com:9465"]"#,
            &format!(r#"["127.0.0.1:{agent_port}"]"#),
        );
    assert!(
        config.contains(&coord_port.to_string()) && config.contains(&agent_port.to_string()),
        "targets not rewritten:\n{config}"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config)?;
    std::fs::copy(shipped.join("ferry-rules.yaml"), dir.path().join("ferry-rules.yaml"))?;
    let args: Vec<String> = vec![
        format!("--config.file={}", dir.path().join("prometheus.yml").display()),
        format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        format!("--web.listen-address=127.0.0.1:{prom_port}"),
    ];
    let _prometheus = Daemon::spawn(
        "prometheus",
        std::path::Path::new("prometheus"),
        &args,
        &[],
        &dir.path().join("prometheus.log"),
    )?;

    let query =
        format!("/api/v1/query?query=ferry_backup_last_success_timestamp_seconds%7Bcluster%3D%22{CLUSTER}%22%7D");
    let value: f64 =
        poll_until("Prometheus to scrape the coordinator", Duration::from_secs(60), Duration::from_millis(500), || {
            let query = query.clone();
            async move {
                let Ok((200, body)) = http_get(prom_port, &query) else { return Ok(None) };
                let v: serde_json::Value = serde_json::from_str(&body)?;
                Ok(v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse().ok()))
            }
        })
        .await?;
    assert_eq!(value as i64, backup_time, "Prometheus has the coordinator's last backup time");

    let (_, rules) = http_get(prom_port, "/api/v1/rules")?;
    for alert in ["FerryBackupTooOld", "FerryBackupsFailing", "FerryAgentDisconnected", "FerryStoreMisconfigured"] {
        assert!(rules.contains(alert), "Prometheus did not load alert {alert}: {rules}");
    }
    Ok(())
}

/// The value of the coordinator's `name{cluster="…"}` series, or None when absent.
fn series(metrics: &str, name: &str, cluster: &str) -> Option<f64> {
    let prefix = format!("{name}{{cluster=\"{cluster}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

async fn wait_metrics(port: u16, what: &str, check: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    poll_until(what, Duration::from_secs(20), Duration::from_millis(200), || {
        let found = http_get(port, "/metrics").ok().map(|(_, m)| m).filter(|m| check(m));
        async move { Ok(found) }
    })
    .await
}

/// The alert rules depend on these: after a restart the per-cluster gauges come from the store, before any agent
/// is back (else "backup too old" and "no agent reaches etcd" stay silent exactly when they matter), and a
/// cluster whose automatic backups are off, or that was deleted, leaves no series that would page for it.
#[tokio::test]
async fn cluster_gauges_are_seeded_at_start_and_removed_when_backups_stop() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(50).await?;
    let port = free_port();
    let mut coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    })
    .await?;
    let mut agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, Duration::from_secs(60)).await?;
    assert_eq!(status["status"], STATUS_OK, "{status}");
    let finished = status["lastbackuptime"]["seconds"].as_f64().context("lastbackuptime")?;

    let mut cluster = coordinator.ctl().get_json("cluster", Some(CLUSTER)).await?;
    cluster["spec"]["backupconfiguration"] = serde_json::json!({ "interval": { "seconds": 3600, "nanos": 0 } });
    coordinator.ctl().apply_yaml(&serde_json::to_string(&cluster)?).await?.ok()?;
    let m = wait_metrics(port, "interval gauge and one agent reaching etcd", |m| {
        series(m, "ferry_backup_interval_seconds", CLUSTER) == Some(3600.0)
            && series(m, "ferry_cluster_etcd_reachable_agents", CLUSTER) == Some(1.0)
    })
    .await?;
    assert_eq!(series(&m, "ferry_backup_consecutive_failures", CLUSTER), Some(0.0), "{m}");
    assert_eq!(series(&m, "ferry_agents_connected", CLUSTER), Some(1.0), "{m}");

    // Restarted with no agent to come back: the gauges come from the stored backup and say nobody is there.
    for a in &mut agents {
        a.stop().await;
    }
    coordinator.restart(Stop::Kill).await?;
    let m = wait_metrics(port, "seeded last-success gauge", |m| {
        series(m, "ferry_backup_last_success_timestamp_seconds", CLUSTER).is_some()
    })
    .await?;
    assert_eq!(series(&m, "ferry_backup_last_success_timestamp_seconds", CLUSTER), Some(finished), "{m}");
    assert_eq!(series(&m, "ferry_agents_connected", CLUSTER), Some(0.0), "{m}");
    assert_eq!(series(&m, "ferry_cluster_etcd_reachable_agents", CLUSTER), Some(0.0), "{m}");
    assert_eq!(series(&m, "ferry_backup_interval_seconds", CLUSTER), Some(3600.0), "{m}");

    // Automatic backups off: no interval, so "overdue" cannot fire; the last success stays.
    let mut cluster = coordinator.ctl().get_json("cluster", Some(CLUSTER)).await?;
    cluster["spec"]["backupconfiguration"] = serde_json::Value::Null;
    coordinator.ctl().apply_yaml(&serde_json::to_string(&cluster)?).await?.ok()?;
    let m =
        wait_metrics(port, "interval gauge removed", |m| series(m, "ferry_backup_interval_seconds", CLUSTER).is_none())
            .await?;
    assert!(series(&m, "ferry_backup_last_success_timestamp_seconds", CLUSTER).is_some(), "{m}");

    // Deleted: nothing labelled with the cluster is left.
    coordinator.ctl().run(&["delete", "cluster", CLUSTER]).await?.ok()?;
    let label = format!("cluster=\"{CLUSTER}\"");
    wait_metrics(port, "every series of the deleted cluster removed", |m| !m.contains(&label)).await.with_context(
        || {
            let m = http_get(port, "/metrics").map(|(_, m)| m).unwrap_or_default();
            m.lines().filter(|l| l.contains(&label)).collect::<Vec<_>>().join("\n")
        },
    )?;
    Ok(())
}
