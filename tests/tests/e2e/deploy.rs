//! `deploy/` as an operator runs it. The commands are read out of the shipped files (the etcd static pods, the
//! coordinator's StatefulSet, the systemd units), with only host paths, ports and placeholders rewritten, and run:
//!
//! - the static-pod agent and restore container as root with no capabilities at all (what their
//!   `securityContext` allows), reading an etcd client key and `agent.key` left 0600 root, as kubeadm and
//!   `ferryctl agent-credentials` leave them, and restoring into a 0700 root data dir;
//! - the systemd agent as the unit's `User=` (created when missing), with credentials from
//!   `ferryctl agent-credentials --owner USER`;
//! - each coordinator with its shipped flags, dialed by the name the agent's file names, mapped to 127.0.0.1
//!   in a private mount namespace of the agent (so the server certificate really is checked against it).
//!
//! Changing users and capabilities needs root; set `FERRY_E2E_SKIP_ROOT=1` to skip those two tests knowingly.
//! A third test checks, without root, that the files agree with each other on names, ports and paths; a fourth, that
//! the gate's files (static pod, kubeadm patch, systemd drop-in) agree, and runs the static pod's gate command.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::coverage::TlsEtcd;
use crate::fixtures::ferry::{ferry_bin, Ferryctl, STATUS_ERROR};
use crate::fixtures::logs::log_tail;
use crate::fixtures::ports::free_port;
use crate::fixtures::process::{output_within, success_stdout, Daemon};
use crate::fixtures::tools::require_program;
use crate::fixtures::{manual_backup_yaml, poll_until, test_dir, unix_now, STARTUP_TIMEOUT, STATUS_OK};
use crate::observe::http_get;

const CLUSTER: &str = "deployed";
const MEMBER: &str = "cp1";
/// The port every shipped file dials the coordinator's QUIC listener on.
const QUIC_PORT: &str = "7443";

fn shipped(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

fn read_shipped(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(shipped(path)).with_context(|| format!("read deploy/{path}"))
}

/// Every YAML document of a shipped file.
fn yaml_docs(path: &str) -> anyhow::Result<Vec<Value>> {
    let text = read_shipped(path)?;
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).with_context(|| format!("parse deploy/{path}")))
        .collect()
}

fn strings(v: &Value, what: &str) -> anyhow::Result<Vec<String>> {
    v.as_sequence()
        .with_context(|| format!("{what} is not a list"))?
        .iter()
        .map(|s| s.as_str().map(str::to_owned).with_context(|| format!("{what} holds a non-string")))
        .collect()
}

/// The container `name` in `pod_spec[list]` (`containers` or `initContainers`).
fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> anyhow::Result<&'a Value> {
    pod_spec[list]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)))
        .with_context(|| format!("no {list} entry named {name}"))
}

/// The single-document pod in `path`.
fn static_pod(path: &str) -> anyhow::Result<Value> {
    yaml_docs(path)?.into_iter().next().with_context(|| format!("deploy/{path} is empty"))
}

fn coordinator_statefulset() -> anyhow::Result<Value> {
    yaml_docs("kubernetes/coordinator.yaml")?
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("StatefulSet"))
        .context("deploy/kubernetes/coordinator.yaml has no StatefulSet")
}

/// `ExecStart=` of a shipped unit, split into words (the units quote nothing).
fn exec_start(unit: &str) -> anyhow::Result<Vec<String>> {
    let line = unit_setting(unit, "ExecStart")?.context("no ExecStart=")?;
    Ok(line.split_whitespace().map(str::to_owned).collect())
}

fn unit_setting(unit: &str, key: &str) -> anyhow::Result<Option<String>> {
    let text = read_shipped(unit)?;
    let prefix = format!("{key}=");
    Ok(text.lines().find_map(|l| l.strip_prefix(&prefix)).map(str::to_owned))
}

/// The value of `--flag=VALUE` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> anyhow::Result<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix)).with_context(|| format!("no {flag}= in {args:?}"))
}

/// `args` with each `(from, to)` replaced, every `from` required to occur (so a changed file fails here
/// loudly instead of running something else).
fn rewrite(args: &[String], subs: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    for (from, _) in subs {
        ensure!(
            args.iter().any(|a| a.contains(from.as_str())),
            "the shipped command no longer contains {from:?}: {args:?}; update tests/tests/e2e/deploy.rs with deploy/"
        );
    }
    Ok(args.iter().map(|a| subs.iter().fold(a.clone(), |a, (from, to)| a.replace(from.as_str(), to))).collect())
}

fn sub(from: &str, to: impl Into<String>) -> (String, String) {
    (from.to_owned(), to.into())
}

/// The agent's `--gate-dir=` and `--data-dir=` (the gate's directory, etcd's data dir) in `args` pointed at
/// fresh `gate/` and `etcd-data/` dirs in `dir`, or dropped while the agent binary has no such flags yet (they come
/// with the agent's side of a restore through the gate; the shipped files carry them already).
fn agent_gate_flags(args: Vec<String>, dir: &Path) -> anyhow::Result<Vec<String>> {
    let help = std::process::Command::new(ferry_bin("ferry-agent")).arg("--help").output()?;
    // An option line of its own (the `gate` subcommand's summary mentions --gate-dir too).
    let supported = String::from_utf8_lossy(&help.stdout).lines().any(|l| l.trim_start().starts_with("--gate-dir"));
    let (gate, data) = (dir.join("gate"), dir.join("etcd-data"));
    for d in [&gate, &data] {
        std::fs::create_dir_all(d)?;
        chmod(d, 0o700)?;
    }
    ensure!(args.iter().any(|a| a.starts_with("--gate-dir=")), "the shipped agent has no --gate-dir=: {args:?}");
    Ok(args
        .into_iter()
        .filter_map(|a| match (a.split_once('='), supported) {
            (Some(("--gate-dir" | "--data-dir", _)), false) => None,
            (Some(("--gate-dir", _)), true) => Some(format!("--gate-dir={}", gate.display())),
            (Some(("--data-dir", _)), true) => Some(format!("--data-dir={}", data.display())),
            _ => Some(a),
        })
        .collect())
}

/// Fails (or skips, with `FERRY_E2E_SKIP_ROOT=1`) unless running as root. Returns false to skip.
fn need_root(test: &str) -> anyhow::Result<bool> {
    // The owner of /proc/self is this process's effective uid.
    let euid = std::fs::metadata("/proc/self").context("stat /proc/self")?.uid();
    if euid == 0 {
        return Ok(true);
    }
    if std::env::var_os("FERRY_E2E_SKIP_ROOT").is_some() {
        eprintln!("SKIPPED {test}: needs root (FERRY_E2E_SKIP_ROOT is set)");
        return Ok(false);
    }
    bail!(
        "{test} runs the agent as other users and without capabilities, which needs root (uid {euid} here): run the tests as root (CI does, through .ci/run), or set FERRY_E2E_SKIP_ROOT=1 to skip it knowingly"
    )
}

/// `(uid, gid)` of `user`, created as a system user when missing (the Debian etcd package creates `etcd`).
async fn ensure_user(user: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag: &'static str| {
        let user = user.to_owned();
        async move {
            let out = tokio::process::Command::new("id").args([flag, &user]).output().await?;
            anyhow::Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse::<u32>()))
        }
    };
    if id("-u").await?.is_none() {
        let out = tokio::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", user])
            .output()
            .await
            .context("run useradd")?;
        success_stdout(&format!("useradd --system {user}"), &out)?;
    }
    let uid = id("-u").await?.context("no uid after useradd")??;
    let gid = id("-g").await?.context("no gid after useradd")??;
    Ok((uid, gid))
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// `program args` run through `unshare --mount` with `hosts` bound over /etc/hosts (so the coordinator's
/// advertised name resolves to 127.0.0.1 for this process only) and then `setpriv privs`.
fn wrapped(hosts: &Path, privs: &[&str], program: &Path, args: &[String]) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let mut all: Vec<String> = vec![
        "--mount".into(),
        "sh".into(),
        "-c".into(),
        r#"mount --bind "$0" /etc/hosts && exec "$@""#.into(),
        hosts.display().to_string(),
        require_program("setpriv")?.display().to_string(),
    ];
    all.extend(privs.iter().map(|p| (*p).to_owned()));
    all.push("--".into());
    all.push(program.display().to_string());
    all.extend(args.iter().cloned());
    Ok((require_program("unshare")?, all))
}

/// Root without a single capability: an empty bounding set, nothing inheritable, no privilege gain by exec —
/// what `capabilities: {drop: [ALL]}` and `allowPrivilegeEscalation: false` leave a root container.
const ROOT_NO_CAPS: &[&str] = &["--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"];

/// A coordinator started with the shipped flags.
struct ShippedCoordinator {
    _process: Daemon,
    ctl: Ferryctl,
    /// The name the flags put in the server certificate (`--advertise-name`).
    name: String,
    port: u16,
    dir: tempfile::TempDir,
}

impl ShippedCoordinator {
    /// `command` from the shipped file; the state dir, ports (and, for `local_store`, the store) are rewritten.
    async fn start(command: &[String], state_dir: &str, extra: &[(String, String)]) -> anyhow::Result<Self> {
        let dir = test_dir("deploy-coordinator")?;
        let (port, metrics) = (free_port(), free_port());
        let state = dir.path().join("state");
        let listen = flag(command, "--listen")?;
        ensure!(
            listen.ends_with(&format!(":{QUIC_PORT}")),
            "the coordinator listens on {listen}, agents dial port {QUIC_PORT}"
        );
        let metrics_listen = flag(command, "--metrics-listen")?;
        let mut subs = vec![
            sub(state_dir, state.display().to_string()),
            sub(listen, listen.replace(QUIC_PORT, &port.to_string())),
            sub(metrics_listen, format!("127.0.0.1:{metrics}")),
        ];
        subs.extend(extra.iter().cloned());
        let args = rewrite(&command[1..], &subs)?;
        let name = flag(command, "--advertise-name")?.to_owned();
        let process = Daemon::spawn(
            "ferry-coordinator (shipped flags)",
            &ferry_bin("ferry-coordinator"),
            &args,
            &[],
            &dir.path().join("coordinator.log"),
        )?;
        // admin.ferryconfig points ferryctl at the advertised name, which only the agent's namespace maps; this
        // test's own ferryctl dials 127.0.0.1, which the certificate names too.
        let admin = state.join("admin.ferryconfig");
        let log = dir.path().join("coordinator.log");
        let config: Value = poll_until(
            "the coordinator to write admin.ferryconfig",
            STARTUP_TIMEOUT,
            Duration::from_millis(100),
            || {
                let admin = admin.clone();
                async move {
                    let Ok(text) = std::fs::read_to_string(&admin) else { return Ok(None) };
                    Ok(serde_yaml_ng::from_str(&text).ok())
                }
            },
        )
        .await
        .with_context(|| format!("coordinator log:\n{}", log_tail(&log, 20)))?;
        let advertised = config["coordinator"].as_str().context("admin.ferryconfig has no coordinator")?;
        ensure!(
            advertised == format!("{name}:{port}"),
            "admin.ferryconfig points ferryctl at {advertised}, not at the advertised {name}:{port}"
        );
        let mut local = config.clone();
        local["coordinator"] = Value::from(format!("127.0.0.1:{port}"));
        let local_path = dir.path().join("local.ferryconfig");
        std::fs::write(&local_path, serde_yaml_ng::to_string(&local)?)?;
        chmod(&local_path, 0o600)?;
        let ctl = Ferryctl::new(&local_path);
        poll_until("the coordinator to answer ferryctl", STARTUP_TIMEOUT, Duration::from_millis(200), || {
            let ctl = ctl.clone();
            async move { Ok(ctl.run(&["get", "agents"]).await?.success().then_some(())) }
        })
        .await
        .with_context(|| format!("coordinator log:\n{}", log_tail(&log, 20)))?;
        Ok(Self { _process: process, ctl, name, port, dir })
    }

    /// `agent-credentials` for CLUSTER/MEMBER into `out`, with `extra` flags (e.g. `--owner etcd`).
    async fn credentials(&self, out: &Path, extra: &[&str]) -> anyhow::Result<()> {
        let out_s = out.display().to_string();
        let mut args = vec!["agent-credentials", "--cluster", CLUSTER, "--member", MEMBER, "--out", &out_s];
        args.extend(extra);
        self.ctl.run(&args).await?.ok()?;
        Ok(())
    }

    /// A hosts file mapping the advertised name to 127.0.0.1.
    fn hosts(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("hosts");
        std::fs::write(&path, format!("127.0.0.1 localhost\n127.0.0.1 {}\n", self.name))?;
        chmod(&path, 0o644)?;
        Ok(path)
    }

    /// Waits until the agent is connected and has reached etcd, then takes a manual backup and waits for it.
    async fn connect_and_back_up(&self, agent: &mut Daemon) -> anyhow::Result<String> {
        let log = agent.log_path().to_owned();
        poll_until("the shipped agent to connect and reach etcd", STARTUP_TIMEOUT, Duration::from_millis(250), || {
            let running = agent.check_running();
            let ctl = self.ctl.clone();
            async move {
                running?;
                let agents = ctl.list_json("agents", None).await?;
                Ok(agents
                    .iter()
                    .any(|a| {
                        a["spec"]["connected"] == true
                            && a["spec"]["etcdversion"].as_str().is_some_and(|v| !v.is_empty())
                    })
                    .then_some(()))
            }
        })
        .await
        .with_context(|| format!("agent log:\n{}", log_tail(&log, 20)))?;
        self.ctl.apply_yaml(&manual_backup_yaml(CLUSTER, unix_now(), 0)).await?.ok()?;
        poll_until("the backup to finish", Duration::from_secs(60), Duration::from_millis(250), || {
            let ctl = self.ctl.clone();
            async move {
                let s = ctl.get_json("etcdbackupstatus", Some(CLUSTER)).await?;
                match s["spec"]["status"].as_i64() {
                    Some(STATUS_OK) => Ok(Some(())),
                    Some(STATUS_ERROR) => bail!("the backup failed: {}", s["spec"]["error"]),
                    _ => Ok(None),
                }
            }
        })
        .await
        .with_context(|| format!("agent log:\n{}", log_tail(&log, 20)))?;
        let backups = self.ctl.list_json("etcdbackup", Some(&format!("ferry.dev/cluster={CLUSTER}"))).await?;
        let id = backups.first().and_then(|b| b["metadata"]["id"].as_str()).context("no backup listed")?;
        Ok(id.to_owned())
    }
}

/// `/healthz` answers on the metrics address the shipped file gives the agent (rewritten to loopback here).
async fn agent_metrics_answer(port: u16) -> anyhow::Result<()> {
    poll_until(
        &format!("the agent's /healthz on port {port}"),
        STARTUP_TIMEOUT,
        Duration::from_millis(200),
        || async move { Ok(http_get(port, "/healthz").ok().filter(|(status, _)| *status == 200).map(|_| ())) },
    )
    .await
}

/// The running process's effective uid and capabilities, from /proc: proof of what the agent ran as.
fn uid_and_caps(process: &Daemon) -> anyhow::Result<(u32, String)> {
    let pid = process.pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace().collect::<Vec<_>>())
    };
    let uid = field("Uid:").and_then(|v| v.get(1).and_then(|u| u.parse().ok())).context("no Uid in status")?;
    let caps = field("CapEff:").and_then(|v| v.first().map(|c| (*c).to_owned())).context("no CapEff in status")?;
    Ok((uid, caps))
}

#[tokio::test]
async fn static_pod_agent_as_root_without_capabilities_backs_up_and_restores() -> anyhow::Result<()> {
    if !need_root("static_pod_agent_as_root_without_capabilities_backs_up_and_restores")? {
        return Ok(());
    }
    let etcd = TlsEtcd::start().await?;
    // As kubeadm leaves it: the client key 0600 root.
    chmod(&etcd.pki.client_key, 0o600)?;
    let pki_dir = etcd.pki.ca.parent().context("pki dir")?.display().to_string();

    let sts = coordinator_statefulset()?;
    let command = strings(&sts["spec"]["template"]["spec"]["containers"][0]["command"], "coordinator command")?;
    // The StatefulSet stores to S3; the S3 path has tests of its own (s3.rs), this one is about files and users.
    let coordinator =
        ShippedCoordinator::start(&command, "/var/lib/ferry", &[sub("--backup-store=s3", "--backup-store=local")])
            .await?;

    let dir = test_dir("deploy-static-pod")?;
    let creds = dir.path().join("agent");
    // As root, as the manifest's header says: agent.key 0600 root.
    coordinator.credentials(&creds, &[]).await?;
    let key = std::fs::metadata(creds.join("agent.key"))?;
    assert_eq!((key.uid(), key.mode() & 0o777), (0, 0o600), "agent.key as agent-credentials leaves it");

    let pod = static_pod("kubernetes/etcd-static-pod.yaml")?;
    let agent = container(&pod["spec"], "containers", "ferry-agent")?;
    let sc = &agent["securityContext"];
    assert_eq!(sc["runAsUser"].as_i64(), Some(0), "the sidecar runs as root: {sc:?}");
    assert_eq!(strings(&sc["capabilities"]["drop"], "drop")?, ["ALL"], "{sc:?}");
    assert!(sc["capabilities"]["add"].is_null(), "this test runs the agent with no capabilities: {sc:?}");
    let node_ip = agent["env"]
        .as_sequence()
        .and_then(|env| env.iter().find(|e| e["name"].as_str() == Some("NODE_IP")))
        .context("the sidecar has no NODE_IP env")?;
    assert_eq!(node_ip["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("status.hostIP"));
    let command = strings(&agent["command"], "ferry-agent command")?;
    let dial = flag(&command, "--coordinator")?;
    assert_eq!(
        dial,
        format!("{}:{QUIC_PORT}", coordinator.name),
        "the sidecar dials what the coordinator's certificate names"
    );
    let metrics = free_port();
    let args = rewrite(
        &command[1..],
        &[
            sub(dial, format!("{}:{}", coordinator.name, coordinator.port)),
            sub("/etc/ferry/agent", creds.display().to_string()),
            sub("/etc/kubernetes/pki/etcd", pki_dir.clone()),
            sub("https://127.0.0.1:2379", etcd.client_url.clone()),
            // What the kubelet does with $(NODE_IP); the port stays the manifest's choice but for the test's.
            sub("$(NODE_IP):9465", format!("127.0.0.1:{metrics}")),
        ],
    )?;
    let args = agent_gate_flags(args, dir.path())?;
    let (program, args) = wrapped(&coordinator.hosts()?, ROOT_NO_CAPS, &ferry_bin("ferry-agent"), &args)?;
    let mut process = Daemon::spawn(
        "ferry-agent (static pod)",
        &program,
        &args,
        &[("RUST_LOG", "info")],
        &dir.path().join("agent.log"),
    )?;
    let backup = coordinator.connect_and_back_up(&mut process).await?;
    agent_metrics_answer(metrics).await?;
    assert_eq!(
        uid_and_caps(&process)?,
        (0, "0000000000000000".to_owned()),
        "the agent ran as root without capabilities"
    );

    // The restore init container, also root without capabilities, into a 0700 root data dir holding data.
    let data_dir = dir.path().join("var-lib-etcd");
    std::fs::create_dir_all(data_dir.join("member/snap"))?;
    std::fs::write(data_dir.join("member/snap/db"), b"old")?;
    chmod(&data_dir, 0o700)?;
    let pod = static_pod("kubernetes/etcd-static-pod-restore.yaml")?;
    let restore = container(&pod["spec"], "initContainers", "ferry-restore")?;
    let sc = &restore["securityContext"];
    assert_eq!(sc["runAsUser"].as_i64(), Some(0), "{sc:?}");
    assert_eq!(strings(&sc["capabilities"]["drop"], "drop")?, ["ALL"], "{sc:?}");
    assert!(sc["capabilities"]["add"].is_null(), "this test restores with no capabilities: {sc:?}");
    let command = strings(&restore["command"], "ferry-restore command")?;
    let args = rewrite(
        &command[1..],
        &[
            sub(flag(&command, "--coordinator")?, format!("{}:{}", coordinator.name, coordinator.port)),
            sub("/etc/ferry/agent", creds.display().to_string()),
            sub("BACKUP_ID", backup),
            sub("/var/lib/etcd", data_dir.display().to_string()),
            sub(
                "NODE1=https://NODE1_IP:2380,NODE2=https://NODE2_IP:2380,NODE3=https://NODE3_IP:2380",
                "cp1=https://127.0.0.1:2380",
            ),
            sub("NODE_NAME", MEMBER),
            sub("NODE_IP", "127.0.0.1"),
            sub("RESTORE_TOKEN", "deploy-restore"),
        ],
    )?;
    let (program, args) = wrapped(&coordinator.hosts()?, ROOT_NO_CAPS, &ferry_bin("ferry-agent"), &args)?;
    let mut cmd = tokio::process::Command::new(&program);
    // The image carries etcd's tools (etcdutl for the revision bump); here, those of the etcd under test.
    cmd.args(&args).env("PATH", crate::fixtures::tools::child_path()).stdin(Stdio::null()).kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD") || key.to_string_lossy().starts_with("FERRY") {
            cmd.env_remove(&key);
        }
    }
    let out = output_within(cmd.output(), "ferry-restore (static pod)", Duration::from_secs(120)).await?;
    success_stdout("ferry-restore as root without capabilities", &out)?;
    assert!(data_dir.join("member/snap/db").metadata()?.len() > 3, "the restored member is in place");
    let old = std::fs::read_dir(&data_dir)?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(".ferry-old-"))
        .context("the old data was not moved aside")?;
    assert_eq!(std::fs::read(old.path().join("member/snap/db"))?, b"old");
    Ok(())
}

#[tokio::test]
async fn systemd_agent_as_its_user_with_owned_credentials_verifies_the_coordinator_and_backs_up() -> anyhow::Result<()>
{
    if !need_root("systemd_agent_as_its_user_with_owned_credentials_verifies_the_coordinator_and_backs_up")? {
        return Ok(());
    }
    let user = unit_setting("systemd/ferry-agent.service", "User")?.context("ferry-agent.service has no User=")?;
    let group = unit_setting("systemd/ferry-agent.service", "Group")?.unwrap_or_else(|| user.clone());
    let (uid, gid) = ensure_user(&user).await?;

    let etcd = TlsEtcd::start().await?;
    // etcd's own user owns its client key, as the unit's header asks; the directories are traversable.
    let pki_dir = etcd.pki.ca.parent().context("pki dir")?;
    chmod(pki_dir, 0o755)?;
    for f in [&etcd.pki.client_key, &etcd.pki.client_cert] {
        std::os::unix::fs::chown(f, Some(uid), Some(gid))?;
    }
    chmod(&etcd.pki.client_key, 0o600)?;

    let command = exec_start("systemd/ferry-coordinator.service")?;
    let coordinator = ShippedCoordinator::start(&command, "/var/lib/ferry", &[]).await?;

    let dir = test_dir("deploy-systemd")?;
    chmod(dir.path(), 0o755)?;
    let creds = dir.path().join("agent");
    coordinator.credentials(&creds, &["--owner", &user]).await?;
    for name in ["ca.crt", "agent.crt", "agent.key"] {
        let m = std::fs::metadata(creds.join(name))?;
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{name} owned by --owner {user}");
    }
    assert_eq!(std::fs::metadata(creds.join("agent.key"))?.mode() & 0o777, 0o600);

    let command = exec_start("systemd/ferry-agent.service")?;
    let dial = flag(&command, "--coordinator")?;
    assert_eq!(
        dial,
        format!("{}:{QUIC_PORT}", coordinator.name),
        "ferry-agent.service dials what ferry-coordinator.service's --advertise-name puts in the certificate"
    );
    let args = rewrite(
        &command[1..],
        &[
            sub(dial, format!("{}:{}", coordinator.name, coordinator.port)),
            sub("/etc/ferry/agent", creds.display().to_string()),
            sub("/etc/etcd/pki", pki_dir.display().to_string()),
            sub("https://127.0.0.1:2379", etcd.client_url.clone()),
        ],
    )?;
    let args = agent_gate_flags(args, dir.path())?;
    for d in ["gate", "etcd-data"] {
        std::os::unix::fs::chown(dir.path().join(d), Some(uid), Some(gid))?;
    }
    // EnvironmentFile=/etc/ferry/agent.env holds FERRY_METRICS_LISTEN=NODE_IP:9465 (loopback here).
    assert_eq!(
        unit_setting("systemd/ferry-agent.service", "EnvironmentFile")?.as_deref(),
        Some("/etc/ferry/agent.env")
    );
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let privs = [format!("--reuid={user}"), format!("--regid={group}"), "--init-groups".into()];
    let privs: Vec<&str> = privs.iter().map(String::as_str).chain(ROOT_NO_CAPS.iter().copied()).collect();
    let (program, args) = wrapped(&coordinator.hosts()?, &privs, &ferry_bin("ferry-agent"), &args)?;
    let env = [("RUST_LOG", "info"), ("FERRY_METRICS_LISTEN", listen.as_str())];
    let mut process = Daemon::spawn("ferry-agent (systemd)", &program, &args, &env, &dir.path().join("agent.log"))?;
    coordinator.connect_and_back_up(&mut process).await?;
    agent_metrics_answer(metrics).await?;
    assert_eq!(uid_and_caps(&process)?, (uid, "0000000000000000".to_owned()), "the agent ran as {user}");
    Ok(())
}

#[tokio::test]
async fn shipped_deploy_files_agree_on_names_ports_and_paths() -> anyhow::Result<()> {
    let docs = yaml_docs("kubernetes/coordinator.yaml")?;
    let service = |name: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some("Service") && d["metadata"]["name"].as_str() == Some(name))
            .with_context(|| format!("coordinator.yaml has no Service {name}"))
    };
    let sts = coordinator_statefulset()?;
    let namespace = sts["metadata"]["namespace"].as_str().context("namespace")?;
    let headless = service(sts["spec"]["serviceName"].as_str().context("serviceName")?)?;
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"), "the StatefulSet's serviceName is headless");
    let command = strings(&sts["spec"]["template"]["spec"]["containers"][0]["command"], "coordinator command")?;
    let advertised = flag(&command, "--advertise-name")?;

    // QUIC: one UDP-only LoadBalancer on the port every agent dials.
    let quic: Vec<&Value> = docs.iter().filter(|d| d["spec"]["type"].as_str() == Some("LoadBalancer")).collect();
    assert_eq!(quic.len(), 1, "one LoadBalancer Service");
    let ports = quic[0]["spec"]["ports"].as_sequence().context("ports")?;
    assert!(
        ports.iter().all(|p| p["protocol"].as_str() == Some("UDP")),
        "the LoadBalancer carries UDP only: {ports:?}"
    );
    assert!(ports.iter().any(|p| p["port"].as_u64() == QUIC_PORT.parse().ok()));

    // Every agent dials the advertised name on that port.
    let unit_agent = exec_start("systemd/ferry-agent.service")?;
    let unit_coord = exec_start("systemd/ferry-coordinator.service")?;
    let mut dials = vec![flag(&unit_agent, "--coordinator")?.to_owned()];
    for (file, list, name) in [
        ("kubernetes/etcd-static-pod.yaml", "containers", "ferry-agent"),
        ("kubernetes/etcd-static-pod-restore.yaml", "containers", "ferry-agent"),
        ("kubernetes/etcd-static-pod-restore.yaml", "initContainers", "ferry-restore"),
    ] {
        let pod = static_pod(file)?;
        dials
            .push(flag(&strings(&container(&pod["spec"], list, name)?["command"], name)?, "--coordinator")?.to_owned());
    }
    for dial in &dials {
        assert_eq!(dial, &format!("{advertised}:{QUIC_PORT}"), "an agent dials {dial}");
    }
    assert_eq!(flag(&unit_coord, "--advertise-name")?, advertised, "both coordinators advertise the same name");

    // Prometheus scrapes the metrics Service and the agents where they listen.
    let prom: Value = serde_yaml_ng::from_str(&read_shipped("prometheus/prometheus.yml")?)?;
    let targets = |job: &str| -> anyhow::Result<Vec<String>> {
        let sc = prom["scrape_configs"]
            .as_sequence()
            .and_then(|s| s.iter().find(|c| c["job_name"].as_str() == Some(job)))
            .with_context(|| format!("no scrape job {job}"))?;
        strings(&sc["static_configs"][0]["targets"], "targets")
    };
    let metrics_service = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Service") && d["spec"]["type"].as_str() == Some("ClusterIP"))
        .context("no ClusterIP metrics Service")?;
    let metrics_port = metrics_service["spec"]["ports"][0]["port"].as_u64().context("metrics port")?;
    let coordinator_metrics = flag(&command, "--metrics-listen")?;
    assert!(coordinator_metrics.ends_with(&format!(":{metrics_port}")));
    let svc = metrics_service["metadata"]["name"].as_str().context("name")?;
    assert_eq!(targets("ferry-coordinator")?, [format!("{svc}.{namespace}.svc:{metrics_port}")]);
    let pod = static_pod("kubernetes/etcd-static-pod.yaml")?;
    let sidecar = strings(&container(&pod["spec"], "containers", "ferry-agent")?["command"], "sidecar")?;
    let agent_port = flag(&sidecar, "--metrics-listen")?.rsplit_once(':').context("port")?.1.to_owned();
    let agent_targets = targets("ferry-agent")?;
    assert!(!agent_targets.is_empty());
    for t in &agent_targets {
        assert!(
            t.ends_with(&format!(":{agent_port}")),
            "Prometheus scrapes {t}, the sidecar listens on port {agent_port}"
        );
        assert!(!t.starts_with("127.") && !t.starts_with("localhost"), "a loopback target reaches no node: {t}");
    }
    assert!(flag(&sidecar, "--metrics-listen")?.starts_with("$(NODE_IP)"), "the sidecar listens on the node IP");

    // One etcd version: the static pods' image, which deploy/Containerfile copies the tools from.
    let containerfile = read_shipped("Containerfile")?;
    for file in ["kubernetes/etcd-static-pod.yaml", "kubernetes/etcd-static-pod-restore.yaml"] {
        let pod = static_pod(file)?;
        let image = container(&pod["spec"], "containers", "etcd")?["image"].as_str().context("image")?.to_owned();
        assert!(
            containerfile.contains(&format!("ETCD_IMAGE={image}")),
            "{file} runs {image}; deploy/Containerfile copies etcd's tools from another image"
        );
    }
    Ok(())
}

/// Applies an RFC 6902 JSON patch made of `add` operations (all a kubeadm patch here uses) to `doc`.
fn apply_json_patch(doc: &mut serde_json::Value, patch: &serde_json::Value) -> anyhow::Result<()> {
    for op in patch.as_array().context("a JSON patch is a list of operations")? {
        ensure!(op["op"] == "add", "only `add` operations are expected: {op}");
        let path = op["path"].as_str().context("an operation without a path")?;
        let (parent, last) = path.rsplit_once('/').with_context(|| format!("path {path}"))?;
        let target = doc.pointer_mut(parent).with_context(|| format!("{path}: the pod has no {parent}"))?;
        let value = op["value"].clone();
        match target {
            serde_json::Value::Array(items) if last == "-" => items.push(value),
            serde_json::Value::Array(items) => {
                let i: usize = last.parse().with_context(|| format!("{path}: not an index"))?;
                ensure!(i <= items.len(), "{path}: past the end");
                items.insert(i, value);
            }
            serde_json::Value::Object(fields) => {
                fields.insert(last.to_owned(), value);
            }
            _ => bail!("{path}: {parent} is neither a list nor an object"),
        }
    }
    Ok(())
}

/// The lines `KEY=` of a shipped unit or drop-in, in order.
fn unit_settings(unit: &str, key: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{key}=");
    Ok(read_shipped(unit)?.lines().filter_map(|l| l.strip_prefix(&prefix)).map(str::to_owned).collect())
}

#[tokio::test]
async fn shipped_gate_files_agree_and_the_static_pods_gate_command_runs() -> anyhow::Result<()> {
    const GATE_DIR: &str = "/var/lib/ferry/gate";
    let pod = static_pod("kubernetes/etcd-static-pod.yaml")?;
    let spec = &pod["spec"];
    let etcd = container(spec, "containers", "etcd")?;
    let command = strings(&etcd["command"], "etcd command")?;
    let sep = command.iter().position(|a| a == "--").context("no `--` in the etcd container's command")?;
    let (gate, etcd_command) = (&command[..sep], &command[sep + 1..]);
    assert_eq!(etcd_command[0], "etcd", "etcd's own command line follows `--`");
    assert_eq!(gate[1], "gate");

    // The binary the etcd container runs is the one the init container copies into the shared emptyDir, from
    // where the Containerfile puts the static build.
    let install = strings(&container(spec, "initContainers", "ferry-gate-install")?["command"], "install")?;
    assert_eq!(install.last(), Some(&gate[0]), "the etcd container runs what ferry-gate-install copies");
    let containerfile = read_shipped("Containerfile")?;
    assert!(containerfile.contains(&format!("/out/static/ferry-agent {}", install[1])), "{install:?}");
    let mount_of = |c: &Value, name: &str| -> Option<String> {
        c["volumeMounts"].as_sequence()?.iter().find(|m| m["name"].as_str() == Some(name))?["mountPath"]
            .as_str()
            .map(str::to_owned)
    };
    let volume = |name: &str| -> anyhow::Result<&Value> {
        spec["volumes"]
            .as_sequence()
            .and_then(|vs| vs.iter().find(|v| v["name"].as_str() == Some(name)))
            .with_context(|| format!("no volume {name}"))
    };
    let bin_dir = Path::new(&gate[0]).parent().context("bin dir")?.display().to_string();
    assert_eq!(mount_of(etcd, "ferry-bin").as_deref(), Some(bin_dir.as_str()));
    assert!(volume("ferry-bin")?["emptyDir"].is_mapping());

    // One gate dir, on the node, mounted by both containers; one data dir.
    let sidecar = container(spec, "containers", "ferry-agent")?;
    let agent_command = strings(&sidecar["command"], "sidecar")?;
    assert_eq!(flag(gate, "--gate-dir")?, GATE_DIR);
    assert_eq!(flag(&agent_command, "--gate-dir")?, GATE_DIR);
    assert_eq!(volume("ferry-gate")?["hostPath"]["path"].as_str(), Some(GATE_DIR));
    assert_eq!(volume("ferry-gate")?["hostPath"]["type"].as_str(), Some("DirectoryOrCreate"));
    for c in [etcd, sidecar] {
        assert_eq!(mount_of(c, "ferry-gate").as_deref(), Some(GATE_DIR), "{:?}", c["name"]);
        assert_eq!(mount_of(c, "etcd-data").as_deref(), Some(flag(etcd_command, "--data-dir")?), "{:?}", c["name"]);
    }
    assert_eq!(flag(gate, "--data-dir")?, flag(etcd_command, "--data-dir")?);
    assert_eq!(flag(&agent_command, "--data-dir")?, flag(etcd_command, "--data-dir")?);

    // The kubeadm patch turns kubeadm's own manifest (the static pod without Ferry's parts) into the static pod.
    let full = serde_json::to_value(&pod)?;
    let mut kubeadm = full.clone();
    let kspec = kubeadm["spec"].as_object_mut().context("spec")?;
    kspec.remove("initContainers");
    let keep = |v: &serde_json::Value, names: &[&str]| names.contains(&v["name"].as_str().unwrap_or_default());
    kspec["volumes"].as_array_mut().context("volumes")?.retain(|v| keep(v, &["etcd-data", "etcd-certs"]));
    let containers = kspec["containers"].as_array_mut().context("containers")?;
    containers.retain(|c| keep(c, &["etcd"]));
    containers[0]["command"].as_array_mut().context("command")?.drain(..=sep);
    containers[0]["volumeMounts"].as_array_mut().context("mounts")?.retain(|m| keep(m, &["etcd-data", "etcd-certs"]));
    let patch: serde_json::Value = serde_json::from_str(&read_shipped("kubernetes/kubeadm-patches/etcd+json.json")?)?;
    apply_json_patch(&mut kubeadm, &patch)?;
    assert!(kubeadm == full, "kubeadm-patches/etcd+json.json and etcd-static-pod.yaml disagree; patched:\n{kubeadm:#}");

    // The systemd drop-in: the agent's unit names the same gate dir and data dir, and may write both.
    let drop_in = "systemd/etcd.service.d/ferry-gate.conf";
    let exec = unit_settings(drop_in, "ExecStart")?;
    assert_eq!(exec.first().map(String::as_str), Some(""), "the drop-in first resets the unit's ExecStart");
    let unit_gate: Vec<String> = exec.last().context("ExecStart")?.split_whitespace().map(str::to_owned).collect();
    let agent_unit = exec_start("systemd/ferry-agent.service")?;
    assert_eq!((unit_gate[0].as_str(), unit_gate[1].as_str()), (agent_unit[0].as_str(), "gate"));
    let state_dir = unit_setting(drop_in, "StateDirectory")?.context("StateDirectory")?;
    let gate_dir = format!("/var/lib/{state_dir}");
    assert_eq!(flag(&unit_gate, "--gate-dir")?, gate_dir);
    assert_eq!(flag(&agent_unit, "--gate-dir")?, gate_dir);
    assert_eq!(flag(&agent_unit, "--data-dir")?, flag(&unit_gate, "--data-dir")?);
    let writable = unit_setting("systemd/ferry-agent.service", "ReadWritePaths")?.unwrap_or_default();
    let writable: Vec<&str> = writable.split_whitespace().map(|p| p.trim_start_matches('-')).collect();
    for path in [gate_dir.as_str(), flag(&unit_gate, "--data-dir")?] {
        assert!(writable.contains(&path), "ferry-agent.service may not write {path}: {writable:?}");
    }
    assert_eq!(unit_setting(drop_in, "NotifyAccess")?.as_deref(), Some("all"), "etcd notifies from the child");
    assert_eq!(unit_setting(drop_in, "KillMode")?.as_deref(), Some("mixed"), "SIGTERM to the gate alone");

    // The static pod's gate command, with its paths in a temp dir, runs etcd (here `etcd --version`) as given.
    let dir = test_dir("deploy-gate")?;
    let args = rewrite(
        &gate[1..],
        &[
            sub(GATE_DIR, dir.path().join("gate").display().to_string()),
            sub("/var/lib/etcd", dir.path().join("etcd").display().to_string()),
        ],
    )?;
    let out = output_within(
        tokio::process::Command::new(ferry_bin("ferry-agent"))
            .args(&args)
            .arg("--")
            .arg(crate::fixtures::tools::etcd_tool("etcd")?)
            .arg("--version")
            .env("NO_COLOR", "1")
            .output(),
        "ferry-agent gate … -- etcd --version",
        Duration::from_secs(30),
    )
    .await?;
    let stdout = success_stdout("the static pod's gate command", &out)?;
    assert!(stdout.contains("etcd Version"), "etcd's output is the gate's: {stdout}");
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("gate/status.json"))?)?;
    assert_eq!(status["etcd"]["data_dir"], dir.path().join("etcd").display().to_string(), "{status}");
    Ok(())
}
