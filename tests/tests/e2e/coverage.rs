//! Paths no other test takes: an etcd member whose client port demands client certificates (the way kubeadm
//! sets etcd up), and `--max-concurrent-backups` capping how many backups run at once across clusters.
//!
//! The TLS member is spawned here rather than by [`EtcdCluster`]: it is the only one that needs certificates,
//! and the harness's own etcd client (plain HTTP) could not reach it anyway; `etcdctl` with the client
//! certificate writes and checks it instead.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::Value;
use tempfile::TempDir;

use crate::fixtures::etcd::{test_key, test_value};
use crate::fixtures::ferry::{STATUS_ERROR, STATUS_RUNNING};
use crate::fixtures::logs::log_tail;
use crate::fixtures::pki::TestCa;
use crate::fixtures::ports::free_port;
use crate::fixtures::process::{output_within, success_stdout, Daemon};
use crate::fixtures::tools::etcd_tool;
use crate::fixtures::{
    assert_no_unexpected_errors, assert_same_kvs, expected_test_kvs, manual_backup_yaml, poll_until, restore_and_read,
    test_dir, unix_now, Agent, Coordinator, CoordinatorOptions, EtcdCluster, STARTUP_TIMEOUT, STATUS_OK, TEST_PREFIX,
};

const MIB: usize = 1024 * 1024;
const BACKUP_TIMEOUT: Duration = Duration::from_secs(45);
/// Deadline for one `etcdctl` run against the TLS member.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(10);

/// Files of a small PKI for one etcd member, as kubeadm lays out `/etc/kubernetes/pki/etcd/`.
#[derive(Debug)]
pub(crate) struct EtcdPki {
    pub(crate) ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
}

impl EtcdPki {
    /// Generates a CA, a server certificate for `127.0.0.1`/`localhost` and a client certificate, and writes
    /// them as PEM files into `dir`.
    fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca = TestCa::new("ferry-e2e etcd-ca")?;
        // The server certificate is a client one too: etcd 3.4's gRPC gateway dials the member's own client
        // port with it (kubeadm's etcd/server.crt carries both usages for the same reason).
        let server = ca.issue(
            "m1",
            &["localhost", "127.0.0.1"],
            &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let client = ca.issue("ferry-agent", &[], &[ExtendedKeyUsagePurpose::ClientAuth])?;

        let pki = Self {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("healthcheck-client.crt"),
            client_key: dir.join("healthcheck-client.key"),
        };
        std::fs::write(&pki.ca, ca.pem())?;
        std::fs::write(&pki.server_cert, server.cert.pem())?;
        std::fs::write(&pki.server_key, server.key.serialize_pem())?;
        std::fs::write(&pki.client_cert, client.cert.pem())?;
        std::fs::write(&pki.client_key, client.key.serialize_pem())?;
        Ok(pki)
    }

    /// `--etcd-cacert CA --etcd-cert CERT --etcd-key KEY` for `ferry-agent`.
    fn agent_args(&self) -> Vec<String> {
        [("--etcd-cacert", &self.ca), ("--etcd-cert", &self.client_cert), ("--etcd-key", &self.client_key)]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
            .collect()
    }
}

/// A one-member etcd cluster serving clients only over TLS with client-certificate auth (peers stay HTTP),
/// killed on drop.
#[derive(Debug)]
pub(crate) struct TlsEtcd {
    // Field order matters: the member is killed before its data dir goes away.
    process: Daemon,
    pub(crate) client_url: String,
    pub(crate) pki: EtcdPki,
    _dir: TempDir,
}

impl TlsEtcd {
    /// Generates the PKI, starts the member and waits until `etcdctl endpoint health` (with the client
    /// certificate) succeeds.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let dir = test_dir("etcd-tls")?;
        let pki = EtcdPki::generate(dir.path())?;
        let client_url = format!("https://127.0.0.1:{}", free_port());
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let data_dir = dir.path().join("m1.etcd").display().to_string();
        let initial_cluster = format!("m1={peer_url}");
        let token = format!("ferry-e2e-tls-{}", std::process::id());
        let (ca, cert, key) =
            (pki.ca.display().to_string(), pki.server_cert.display().to_string(), pki.server_key.display().to_string());
        let flags: [(&str, &str); 13] = [
            ("--name", "m1"),
            ("--data-dir", &data_dir),
            ("--listen-client-urls", &client_url),
            ("--advertise-client-urls", &client_url),
            ("--listen-peer-urls", &peer_url),
            ("--initial-advertise-peer-urls", &peer_url),
            ("--initial-cluster", &initial_cluster),
            ("--initial-cluster-token", &token),
            ("--initial-cluster-state", "new"),
            // kubeadm's client-port flags.
            ("--cert-file", &cert),
            ("--key-file", &key),
            ("--client-cert-auth", "true"),
            ("--trusted-ca-file", &ca),
        ];
        let quick = [("--heartbeat-interval", "50"), ("--election-timeout", "500")];
        let logging = [("--logger", "zap"), ("--log-outputs", "stderr")];
        let args: Vec<String> =
            flags.iter().chain(&quick).chain(&logging).map(|(flag, value)| format!("{flag}={value}")).collect();
        let process = Daemon::spawn("etcd m1 (TLS)", &etcd_tool("etcd")?, &args, &[], &dir.path().join("etcd-m1.log"))?;
        let mut etcd = Self { process, client_url, pki, _dir: dir };
        etcd.wait_healthy().await?;
        Ok(etcd)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let process = &mut self.process;
        let (pki, url) = (&self.pki, &self.client_url);
        let result = poll_until(
            &format!("etcd m1 at {url} to report healthy over TLS"),
            STARTUP_TIMEOUT,
            Duration::from_millis(200),
            || {
                let running = process.check_running();
                async move {
                    running?;
                    etcdctl(url, pki, true, &["endpoint", "health"]).await?;
                    Ok(Some(()))
                }
            },
        )
        .await;
        result.with_context(|| format!("etcd log:\n{}", log_tail(self.process.log_path(), 20)))
    }
}

/// Runs `etcdctl --endpoints URL --cacert CA [--cert CERT --key KEY] args...` and returns its stdout when it
/// succeeds, its stderr as the error otherwise. `client_cert` false leaves the client certificate out.
async fn etcdctl(url: &str, pki: &EtcdPki, client_cert: bool, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(etcd_tool("etcdctl")?);
    // ETCDCTL_* from the environment would add to or override the flags.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("ETCDCTL_API", "3").args(["--endpoints", url, "--dial-timeout", "2s", "--command-timeout", "5s"]);
    cmd.arg("--cacert").arg(&pki.ca);
    if client_cert {
        cmd.arg("--cert").arg(&pki.client_cert).arg("--key").arg(&pki.client_key);
    }
    cmd.args(args).kill_on_drop(true);
    let command = format!("etcdctl {}", args.join(" "));
    let output = output_within(cmd.output(), &command, ETCDCTL_TIMEOUT).await?;
    success_stdout(&command, &output)
}

/// Waits until the connected agent of `cluster`/`m1` has reported on its etcd member (an etcd version, or an
/// `etcderror` saying why it could not read one) and returns its `Agents.ferry.dev` spec.
async fn wait_member_report(coordinator: &Coordinator, cluster: &str, agent: &mut Agent) -> anyhow::Result<Value> {
    poll_until(
        &format!("the agent of {cluster} to report on etcd"),
        STARTUP_TIMEOUT,
        Duration::from_millis(250),
        || {
            let running = agent.check_running();
            async move {
                running?;
                let connected = coordinator.connected_agents(cluster).await?;
                let spec = connected.first().map(|a| a["spec"].clone()).context("no connected agent yet")?;
                let reported = |field: &str| spec[field].as_str().is_some_and(|v| !v.is_empty());
                if reported("etcdversion") || reported("etcderror") {
                    Ok(Some(spec))
                } else {
                    anyhow::bail!("no report on etcd yet: {spec}")
                }
            }
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", log_tail(agent.log_path(), 20)))
}

#[tokio::test]
async fn agent_backs_up_an_etcd_member_that_requires_client_certificates() -> anyhow::Result<()> {
    const CLUSTER: &str = "kubeadm";
    const KEYS: usize = 20;
    let etcd = TlsEtcd::start().await?;
    let url = etcd.client_url.as_str();
    for i in 0..KEYS {
        etcdctl(url, &etcd.pki, true, &["put", &test_key(i), &test_value(i)]).await?;
    }
    // The member really demands a client certificate: trusting its CA is not enough.
    let refused = etcdctl(url, &etcd.pki, false, &["get", &test_key(0)]).await;
    assert!(refused.is_err(), "etcdctl without a client certificate was served: {refused:?}");

    let coordinator = Coordinator::start(CoordinatorOptions::default()).await?;
    let creds = coordinator.issue_agent_credentials(CLUSTER, "m1").await?;
    let mut agent = Agent::start_with_args(&coordinator, &creds, url, &etcd.pki.agent_args())?;
    coordinator.wait_agents_connected(CLUSTER, &["m1"], STARTUP_TIMEOUT).await?;
    // The agent reads the member's status over TLS: it reports the etcd version and no etcd error.
    let spec = wait_member_report(&coordinator, CLUSTER, &mut agent).await?;
    assert!(spec["etcdversion"].as_str().is_some_and(|v| !v.is_empty()), "no etcd version reported: {spec:#}");
    assert_eq!(spec["etcderror"], "", "the agent with the client certificate reports an etcd error: {spec:#}");

    coordinator.manual_backup(CLUSTER).await?;
    let status = coordinator.wait_backup_status(CLUSTER, BACKUP_TIMEOUT).await?;
    assert_eq!(status["status"], STATUS_OK, "backup of the TLS member failed: {status:#}");
    let backups = coordinator.backups(CLUSTER).await?;
    assert_eq!(backups.len(), 1, "exactly one backup of {CLUSTER}: {backups:#?}");
    let id = backups[0]["metadata"]["id"].as_str().context("backup metadata.id")?;
    let snapshot = coordinator.dir().join("tls.snapshot");
    coordinator.download_backup(CLUSTER, id, &snapshot, true).await?;
    let restored: HashMap<String, String> =
        restore_and_read(&snapshot).await?.into_iter().filter(|(k, _)| k.starts_with(TEST_PREFIX)).collect();
    assert_same_kvs(&expected_test_kvs(KEYS), &restored, "keys restored from the backup of the TLS member");

    // Controls: without the TLS flags the agent does not trust the member's certificate; with the CA but no
    // client certificate the member refuses the agent. Either way the agent stays connected and says why.
    let ca_only = vec!["--etcd-cacert".to_owned(), etcd.pki.ca.display().to_string()];
    for (cluster, args) in [("no-tls-flags", Vec::new()), ("ca-only", ca_only)] {
        let creds = coordinator.issue_agent_credentials(cluster, "m1").await?;
        let mut refused = Agent::start_with_args(&coordinator, &creds, url, &args)?;
        let spec = wait_member_report(&coordinator, cluster, &mut refused).await?;
        let error = spec["etcderror"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "the agent of {cluster} read the member without a client certificate: {spec:#}");
        eprintln!("{cluster}: etcderror {error:?}");
    }

    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    assert_no_unexpected_errors(agent.log_path(), &[]);
    Ok(())
}

#[tokio::test]
async fn at_most_max_concurrent_backups_run_at_once() -> anyhow::Result<()> {
    const CLUSTERS: [&str; 5] = ["q1", "q2", "q3", "q4", "q5"];
    const MAX_CONCURRENT: usize = 2;
    // Incompressible 6 MiB at 16 Mbit/s take about 3 s per backup: several polls see each one running.
    let etcd = EtcdCluster::start(1).await?;
    etcd.put_random_values(6 * MIB, 7).await?;
    let max_concurrent = MAX_CONCURRENT.to_string();
    let coordinator = Coordinator::start(CoordinatorOptions {
        extra_args: ["--max-concurrent-backups", &max_concurrent, "--upload-limit-mbps", "16"]
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
        ..CoordinatorOptions::default()
    })
    .await?;
    // Five clusters as far as Ferry knows, one etcd member underneath: five agents read the same data.
    let mut agents = Vec::new();
    for cluster in CLUSTERS {
        let creds = coordinator.issue_agent_credentials(cluster, "m1").await?;
        agents.push(Agent::start(&coordinator, &creds, etcd.member(0).client_url())?);
    }
    for cluster in CLUSTERS {
        coordinator.wait_agents_connected(cluster, &["m1"], STARTUP_TIMEOUT).await?;
    }

    // All five requested in one apply, so they queue at once.
    let now = unix_now();
    let yaml: Vec<String> = CLUSTERS.iter().map(|c| manual_backup_yaml(c, now, 0)).collect();
    coordinator.ctl().apply_yaml(&yaml.join("---\n")).await?.ok()?;

    let ctl = coordinator.ctl();
    let deadline = tokio::time::Instant::now() + BACKUP_TIMEOUT;
    let mut max_running = 0;
    // Each poll's statuses, for the failure message.
    let mut timeline: Vec<String> = Vec::new();
    loop {
        let statuses = ctl.list_json("etcdbackupstatus", None).await?;
        let by_cluster: BTreeMap<&str, &Value> = statuses
            .iter()
            .filter_map(|s| Some((s["metadata"]["id"].as_str()?, &s["spec"])))
            .filter(|(id, _)| CLUSTERS.contains(id))
            .collect();
        let status_of = |c: &str| by_cluster.get(c).and_then(|s| s["status"].as_i64()).unwrap_or(0);
        let running = CLUSTERS.iter().filter(|c| status_of(c) == STATUS_RUNNING).count();
        max_running = max_running.max(running);
        timeline.push(CLUSTERS.iter().map(|c| format!("{c}={}", status_of(c))).collect::<Vec<_>>().join(" "));
        assert!(
            running <= MAX_CONCURRENT,
            "{running} backups running at once with --max-concurrent-backups {MAX_CONCURRENT}; polls:\n{}",
            timeline.join("\n")
        );
        for (cluster, spec) in &by_cluster {
            assert_ne!(spec["status"], STATUS_ERROR, "the backup of {cluster} failed: {spec:#}");
        }
        if CLUSTERS.iter().all(|c| status_of(c) == STATUS_OK) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every backup succeeded within {BACKUP_TIMEOUT:?}; polls:\n{}\ncoordinator log:\n{}",
            timeline.join("\n"),
            log_tail(coordinator.log_path(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("at most {max_running} backup(s) seen running at once over {} polls", timeline.len());
    assert!(max_running >= 1, "no poll saw a backup running; polls:\n{}", timeline.join("\n"));

    for cluster in CLUSTERS {
        let backups = coordinator.backups(cluster).await?;
        assert_eq!(backups.len(), 1, "exactly one backup of {cluster}: {backups:#?}");
    }
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    for agent in &mut agents {
        agent.check_running()?;
        assert_no_unexpected_errors(agent.log_path(), &[]);
    }
    Ok(())
}
