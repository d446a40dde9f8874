//! ferryctl for people: `backup now --wait`, `get -w`, progress on a terminal and not in a pipe, versions,
//! completions.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::AsyncReadExt as _;

use crate::fixtures::ferry::ferry_bin;
use crate::fixtures::ferry::STATUS_RUNNING;
use crate::fixtures::{Coordinator, CoordinatorOptions, EtcdCluster, STATUS_OK};

const CLUSTER: &str = "prod";
const MIB: usize = 1 << 20;
/// Every Ferry binary carries the workspace version.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Quotes a word for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `ferryctl args…` under a pseudo-terminal (`script -qc … /dev/null`, util-linux): what an operator at
/// a terminal sees, stdout and stderr together.
async fn under_pty(ctl: &crate::fixtures::ferry::Ferryctl, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let (bin, config) = ctl.bin_and_config();
    let mut line =
        format!("{} --ferryconfig {}", sh_quote(&bin.display().to_string()), sh_quote(&config.display().to_string()));
    for a in args {
        line.push(' ');
        line.push_str(&sh_quote(a));
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .context("script -qc did not end within 60s")?
    .context("run script (util-linux)")?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// A throttled backup (6 MiB of random values at 8 Mbit/s: a few seconds) followed by `backup now --wait`,
/// watched by `get -w`; then the backup is downloaded at a terminal and through a pipe.
#[tokio::test]
async fn backup_now_wait_stores_a_backup_that_get_w_watches_and_download_shows_progress_on_a_terminal(
) -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_random_values(6 * MIB, 21).await?;
    let coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: ["--upload-limit-mbps", "8"].map(String::from).to_vec(),
        ..Default::default()
    })
    .await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    let ctl = coordinator.ctl().with_timeout(Duration::from_secs(120));

    // Versions: ferryctl's, the coordinator's and the protocol both speak; each agent's in `get agents`.
    let version = ctl.run(&["version"]).await?.ok()?;
    assert!(version.stdout.contains(&format!("ferryctl:    {VERSION} (protocol")), "{}", version.stdout);
    assert!(version.stdout.contains(&format!("coordinator: {VERSION} (protocol")), "{}", version.stdout);
    let agents = ctl.run(&["get", "agents"]).await?.ok()?;
    assert!(agents.stdout.contains("AGENT VERSION"), "{}", agents.stdout);
    assert!(agents.stdout.lines().nth(1).is_some_and(|l| l.contains(VERSION)), "{}", agents.stdout);

    let mut watch = ctl.command(&["get", "-w", "etcdbackupstatus", CLUSTER]).spawn().context("spawn get -w")?;
    let mut watch_out = watch.stdout.take().context("get -w stdout")?;
    let selector = format!("ferry.dev/cluster={CLUSTER}");
    let mut watch_json = ctl
        .command(&["get", "--watch", "etcdbackupstatuses", "-o", "json", "--selector", &selector])
        .spawn()
        .context("spawn get --watch -o json")?;
    let mut watch_json_out = watch_json.stdout.take().context("get --watch -o json stdout")?;
    // The watch prints the current state first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    let now = ctl.run(&["backup", "now", CLUSTER, "--wait", "--timeout", "90s"]).await?;
    assert!(now.success(), "backup now --wait failed: {now:?}");
    assert!(now.stdout.contains(&format!("backup of cluster {CLUSTER} requested")), "{}", now.stdout);
    let stored = now.stdout.lines().find(|l| l.contains(" stored: ")).context("no `stored` line")?;
    let id = stored.split_whitespace().nth(1).context("backup id in the stored line")?.to_string();
    // Not a terminal: plain progress lines on stderr, no bar, nothing of it on stdout.
    assert!(!now.stderr.contains('\r') && !now.stderr.contains('\u{1b}'), "a bar on a pipe: {:?}", now.stderr);
    assert!(!now.stdout.contains("MB/s"), "progress on stdout: {:?}", now.stdout);
    assert!(started.elapsed() > Duration::from_secs(2), "the backup was meant to be throttled");

    let backups = coordinator.backups(CLUSTER).await?;
    assert!(backups.iter().any(|b| b["metadata"]["id"] == id.as_str()), "{id} not listed: {backups:#?}");

    // `get -w` printed the status as it changed: running with bytes done, then ok.
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch.start_kill()?;
    let mut printed = String::new();
    tokio::time::timeout(Duration::from_secs(10), watch_out.read_to_string(&mut printed)).await??;
    let _ = watch.wait().await;
    watch_json.start_kill()?;
    let mut json = String::new();
    tokio::time::timeout(Duration::from_secs(10), watch_json_out.read_to_string(&mut json)).await??;
    let _ = watch_json.wait().await;
    let rows: Vec<&str> = printed.lines().collect();
    assert!(rows.first().is_some_and(|h| h.starts_with("ID") && h.contains("STATUS")), "header first: {printed}");
    assert_eq!(rows.iter().filter(|l| l.starts_with("ID")).count(), 1, "one header: {printed}");
    let running = rows.iter().position(|l| l.contains("Running"));
    let ok = rows.iter().rposition(|l| l.contains(" Ok "));
    assert!(running.is_some() && ok > running, "get -w should show Running, then Ok: {printed}");
    // With -o json: one object per change, each parseable on its own.
    let objects = serde_json::Deserializer::from_str(&json)
        .into_iter::<serde_json::Value>()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("get -w -o json printed no JSON objects: {json}"))?;
    let statuses: Vec<i64> = objects.iter().filter_map(|o| o["spec"]["status"].as_i64()).collect();
    let first_running = statuses.iter().position(|s| *s == STATUS_RUNNING);
    assert!(
        first_running.is_some_and(|i| statuses[i..].contains(&STATUS_OK)),
        "get -w -o json should show running, then ok: {statuses:?}"
    );

    // Download at a terminal: a bar with rate and ETA. Through a pipe: no bar, stdout only the result.
    let out = coordinator.dir().join("pty.snapshot");
    let out_str = out.display().to_string();
    let (ok, seen) = under_pty(&ctl, &["backup", "download", CLUSTER, &id, "-o", &out_str]).await?;
    assert!(ok, "download under a pty failed: {seen}");
    assert!(seen.contains(&format!("download {id} [")) && seen.contains("ETA"), "no bar on a terminal: {seen:?}");
    let out2 = coordinator.dir().join("pipe.snapshot");
    let out2_str = out2.display().to_string();
    let piped = ctl.run(&["backup", "download", CLUSTER, &id, "-o", &out2_str]).await?.ok()?;
    assert!(!piped.stderr.contains('\u{1b}') && !piped.stderr.contains('\r'), "a bar on a pipe: {:?}", piped.stderr);
    assert!(piped.stderr.contains(&format!("download {id}: ")), "a plain progress line: {:?}", piped.stderr);
    assert_eq!(piped.stdout.lines().count(), 1, "stdout holds the result only: {:?}", piped.stdout);
    assert_eq!(std::fs::read(&out)?, std::fs::read(&out2)?);
    Ok(())
}

#[tokio::test]
async fn backup_now_wait_fails_with_the_error_when_every_etcd_member_is_down() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    etcd.put_keys(100).await?;
    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let _agents = coordinator.start_agents(CLUSTER, &etcd).await?;
    etcd.stop_all().await?;

    let started = Instant::now();
    let ctl = coordinator.ctl().with_timeout(Duration::from_secs(120));
    let now = ctl.run(&["backup", "now", CLUSTER, "--wait", "--timeout", "60s"]).await?;
    assert!(started.elapsed() < Duration::from_secs(70), "--timeout 60s not kept: {:?}", started.elapsed());
    assert_eq!(now.status.code(), Some(2), "a failed backup is the server side's failure (exit 2): {now:?}");
    let stderr = now.stderr.trim();
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error: ")).count(), 1, "one error line: {stderr}");
    let error = stderr.lines().last().unwrap_or_default();
    assert!(error.starts_with(&format!("error: the backup of cluster {CLUSTER} failed: ")), "{stderr}");
    assert!(error.contains("etcd"), "the error names etcd: {stderr}");
    assert!(coordinator.backups(CLUSTER).await?.is_empty(), "nothing may be listed");

    // Refused input stays exit 1: an unknown cluster.
    let unknown = ctl.run(&["backup", "now", "no-such-cluster", "--wait"]).await?;
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(unknown.stderr.starts_with("error: no agent of cluster"), "{}", unknown.stderr);
    Ok(())
}

#[tokio::test]
async fn completion_scripts_load_and_daemons_print_their_versions() -> anyhow::Result<()> {
    let ferryctl = ferry_bin("ferryctl");
    let dir = crate::fixtures::test_dir("completion")?;
    for shell in ["bash", "zsh", "fish"] {
        let out = tokio::process::Command::new(&ferryctl).args(["completion", shell]).output().await?;
        assert!(out.status.success(), "completion {shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout)?;
        assert!(script.contains("ferryctl"), "completion {shell}: {script}");
        if shell != "fish" {
            // clap_complete's fish script completes flags and subcommands, not positional values.
            assert!(script.contains("etcdbackupstatuses"), "resource types in the {shell} script");
        }
        std::fs::write(dir.path().join(format!("ferryctl.{shell}")), script)?;
    }
    let bash = dir.path().join("ferryctl.bash");
    let syntax = tokio::process::Command::new("bash").arg("-n").arg(&bash).output().await?;
    assert!(syntax.status.success(), "bash -n: {}", String::from_utf8_lossy(&syntax.stderr));
    let sourced = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p ferryctl", bash.display()))
        .output()
        .await?;
    let said = String::from_utf8_lossy(&sourced.stdout);
    assert!(sourced.status.success() && said.contains("ferryctl"), "complete -p: {said} {sourced:?}");

    for bin in ["ferry-agent", "ferry-coordinator", "ferryctl"] {
        let out = tokio::process::Command::new(ferry_bin(bin)).arg("--version").output().await?;
        assert!(out.status.success(), "{bin} --version");
        assert_eq!(String::from_utf8(out.stdout)?.trim(), format!("{bin} {VERSION}"));
    }
    let client = tokio::process::Command::new(&ferryctl).args(["version", "--client"]).output().await?;
    assert!(String::from_utf8(client.stdout)?.starts_with(&format!("ferryctl:    {VERSION} (protocol ")));
    Ok(())
}

#[tokio::test]
async fn the_agent_refuses_pacing_flags_out_of_range_with_a_clear_error() -> anyhow::Result<()> {
    let agent = ferry_bin("ferry-agent");
    for (flag, value, says) in [
        ("--etcd-read-floor-mibps", "0", "is not a floor: give MiB/s from 1 to 100000"),
        ("--etcd-read-floor-mibps", "fast", "is not a floor"),
        ("--etcd-latency-backoff", "0.5", "is not a factor: give 0"),
        ("--etcd-read-limit-mibps", "100001", "100001 is not in 0..=100000"),
    ] {
        let out = tokio::process::Command::new(&agent).arg(format!("{flag}={value}")).output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(says), "{flag} {value}: {stderr}");
    }
    Ok(())
}
