//! `ferry-agent gate`: etcd runs as the gate's child, and the agent's [`GateControl`] holds it (stopped, and
//! stopped it stays, across a killed and restarted gate), restarts it with flags overridden, or releases it
//! to its own arguments. Real etcd 3.5 members under the real `ferry-agent` binary.

use std::time::Duration;

use ferry_agent::gate::{data_dir_in_use, GateState};

use crate::fixtures::etcd::connect;
use crate::fixtures::ferry::ferry_bin;
use crate::fixtures::ports::free_port;
use crate::fixtures::process::output_within;
use crate::fixtures::{assert_no_unexpected_errors, poll_until, test_dir, EtcdCluster, STARTUP_TIMEOUT};

/// For one gate command: etcd stops in well under a second, and starts in about one.
const GATE_TIMEOUT: Duration = Duration::from_secs(30);
const OWNER: &str = "restore-e2e";

/// Whether an etcd answers a read at `url`.
async fn serves(url: &str) -> bool {
    let read = async {
        let mut client = connect(&[url.to_owned()]).await?;
        client.get("ferry-e2e-gate", None).await.map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), read).await, Ok(Ok(_)))
}

/// Whether nothing listens on loopback port `port`.
async fn refuses(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err()
}

/// Waits until an etcd serves at `url`.
async fn wait_serving(url: &str) -> anyhow::Result<()> {
    poll_until(&format!("etcd to serve at {url}"), STARTUP_TIMEOUT, Duration::from_millis(200), || async {
        Ok(serves(url).await.then_some(()))
    })
    .await
}

fn pid_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Gone, or a zombie (`Z`): not running.
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

#[tokio::test]
async fn gated_etcd_serves_and_the_gate_reports_its_configuration() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start_gated(1).await?;
    let member = etcd.member(0);
    assert!(serves(member.client_url()).await);
    let status = etcd.gate(0).status()?.expect("the gate wrote its status");
    assert_eq!(status.state, GateState::Running);
    assert_eq!(status.applied_generation, 0, "no command.json: generation 0");
    assert_eq!(status.gate_pid, member.process_pid().expect("the gate runs"));
    let pid = status.pid.expect("etcd's pid");
    assert_ne!(pid, status.gate_pid, "etcd is the gate's child, not the gate");
    assert_eq!(status.etcd.name, "m1");
    assert_eq!(status.etcd.data_dir, member.data_dir().display().to_string());
    assert_eq!(status.etcd.listen_client_urls, member.client_url());
    assert_eq!(status.etcd.advertise_client_urls, member.client_url());
    assert_eq!(status.etcd.initial_advertise_peer_urls, member.peer_url());
    assert_eq!(status.etcd.initial_cluster, etcd.initial_cluster());
    assert!(status.etcd.initial_cluster_token.starts_with("ferry-e2e-"), "{:?}", status.etcd);
    assert_eq!(status.base_args, status.effective_args);
    Ok(())
}

#[tokio::test]
async fn a_hold_stops_etcd_unlocks_its_data_and_survives_a_killed_gate() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start_gated(1).await?;
    let gate = etcd.gate(0);
    let port = etcd.member(0).client_port();
    let old_pid = gate.status()?.and_then(|s| s.pid).expect("etcd runs");

    let status = gate.hold(OWNER, GATE_TIMEOUT).await?;
    assert_eq!((status.state, status.pid, status.owner.as_str()), (GateState::Held, None, OWNER));
    assert!(refuses(port).await, "a held etcd listens on nothing");
    assert!(!pid_alive(old_pid), "etcd {old_pid} is gone");
    assert!(!data_dir_in_use(etcd.member(0).data_dir())?, "the data dir is unlocked once held");
    // Holding again for the same owner: no new generation, same answer.
    let again = gate.hold(OWNER, GATE_TIMEOUT).await?;
    assert_eq!(again.applied_generation, status.applied_generation);
    // Another owner (a new restore after a failed one) takes the hold over; etcd stays down.
    let taken = gate.hold("someone-else", GATE_TIMEOUT).await?;
    assert_eq!((taken.state, taken.owner.as_str()), (GateState::Held, "someone-else"));
    assert!(taken.applied_generation > status.applied_generation);

    // A reboot: the gate dies without a word, and comes back with the same arguments.
    etcd.member_mut(0).kill_gate();
    etcd.respawn_member(0)?;
    let new_gate = etcd.member(0).process_pid().expect("the gate runs again");
    poll_until("the restarted gate to report", GATE_TIMEOUT, Duration::from_millis(100), || async {
        Ok(gate.status()?.filter(|s| s.gate_pid == new_gate))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = gate.status()?.expect("status");
    assert_eq!((status.state, status.pid), (GateState::Held, None), "the hold outlives the gate: {status:?}");
    assert!(refuses(port).await, "etcd stays stopped after the gate restarts");
    assert!(!data_dir_in_use(etcd.member(0).data_dir())?);

    // Released: etcd on its own arguments again, with its data.
    let status = gate.release(OWNER, GATE_TIMEOUT).await?;
    assert_eq!(status.state, GateState::Running);
    wait_serving(etcd.member(0).client_url()).await?;
    assert_no_unexpected_errors(etcd.member(0).log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn overrides_move_etcd_to_another_port_and_release_brings_it_back() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start_gated(3).await?;
    etcd.put_keys(10).await?;
    let gate = etcd.gate(1);
    let member = etcd.member(1);
    let other_port = free_port();
    let other_url = format!("http://127.0.0.1:{other_port}");
    let overrides = vec![
        ("--listen-client-urls".to_owned(), other_url.clone()),
        ("--advertise-client-urls".to_owned(), other_url.clone()),
    ];

    let status = gate.start(OWNER, overrides.clone(), GATE_TIMEOUT).await?;
    assert_eq!(status.overrides, overrides);
    assert!(status.effective_args.contains(&format!("--listen-client-urls={other_url}")), "{status:?}");
    assert!(!status.effective_args.iter().any(|a| a.contains(member.client_url())), "{status:?}");
    wait_serving(&other_url).await?;
    assert!(refuses(member.client_port()).await, "not on its own port while overridden");
    // Idempotent: the same start writes no new generation.
    let again = gate.start(OWNER, overrides, GATE_TIMEOUT).await?;
    assert_eq!(again.applied_generation, status.applied_generation);
    assert_eq!(again.pid, status.pid, "nor restarts etcd");

    let released = gate.release(OWNER, GATE_TIMEOUT).await?;
    assert!(released.overrides.is_empty());
    assert_eq!(released.effective_args, released.base_args);
    wait_serving(member.client_url()).await?;
    assert!(refuses(other_port).await, "back on its own port only");
    assert_eq!(etcd.read_prefix(crate::fixtures::TEST_PREFIX).await?.len(), 10, "the cluster kept its data");
    assert_no_unexpected_errors(member.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn sigterm_to_the_gate_stops_etcd_and_the_gate() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start_gated(1).await?;
    let pid = etcd.gate(0).status()?.and_then(|s| s.pid).expect("etcd runs");
    let exited_on_its_own = etcd.member_mut(0).stop().await;
    assert!(exited_on_its_own, "the gate exits after SIGTERM, without being killed");
    assert!(!pid_alive(pid), "etcd {pid} stopped with the gate");
    assert!(refuses(etcd.member(0).client_port()).await);
    let status = etcd.gate(0).status()?.expect("status");
    assert_eq!((status.state, status.pid), (GateState::Stopping, None));
    Ok(())
}

#[tokio::test]
async fn etcd_dying_on_its_own_makes_the_gate_exit_with_its_code() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start_gated(1).await?;
    let pid = etcd.gate(0).status()?.and_then(|s| s.pid).expect("etcd runs");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    assert!(killed.success());
    let status = etcd.member_mut(0).wait_exit(GATE_TIMEOUT).await?;
    assert_eq!(status.code(), Some(128 + 9), "etcd's death by SIGKILL, as a shell reports it: {status}");
    let log = std::fs::read_to_string(etcd.member(0).log_path())?;
    assert!(log.contains("etcd exited on its own"), "the gate says why it exits:\n{log}");
    Ok(())
}

#[tokio::test]
async fn gate_without_an_etcd_command_is_refused_clearly() -> anyhow::Result<()> {
    let dir = test_dir("gate-usage")?;
    let output = output_within(
        tokio::process::Command::new(ferry_bin("ferry-agent"))
            .args(["gate", "--gate-dir"])
            .arg(dir.path().join("gate"))
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .arg("--")
            .env("NO_COLOR", "1")
            .output(),
        "ferry-agent gate --",
        Duration::from_secs(30),
    )
    .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no etcd command after `--`") && stderr.contains("-- etcd"), "{stderr}");
    Ok(())
}
