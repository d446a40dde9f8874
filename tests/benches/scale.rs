//! Scale benchmark: how many agents one coordinator carries, with simulated agents on real QUIC + mTLS links.
//!
//! `cargo build --release --bins && cargo bench -p ferry-tests --bench scale`
//!
//! For each size (default 999, 3 000 and 9 999 agents, 3 per cluster; `FERRY_SCALE_AGENTS=300,999` picks
//! others) it starts a fresh release `ferry-coordinator` with the local store, issues one real agent
//! certificate per simulated agent through the admin API (`AgentCredentials`, the request behind
//! `ferryctl agent-credentials`, so each is recorded as the coordinator requires), and connects every agent
//! from this one process over a few shared quinn endpoints. Each agent reports every 10 s like `ferry-agent`,
//! answers the member check (`HashKv`) and answers backup jobs with one small real etcd snapshot (taken once
//! from a throwaway etcd at startup, compressed once, sent for every job). Then it measures:
//! - the coordinator's RSS and its CPU seconds over a fixed steady-state window (utime + stime from
//!   /proc/PID/stat), as % of one core: the machine is shared, so this is the coordinator's own time, not
//!   wall-clock load;
//! - `ferryctl get agents` wall time (the real binary, median of 3);
//! - a round of manual backups to every cluster: time until the one `Apply` was answered (every job queued),
//!   until every cluster's job reached an agent (dispatch; at most `--max-concurrent-backups`, default 8, run
//!   at once) and until every backup was committed;
//! - SIGTERM and restart of the coordinator: time until every agent is connected again, and that no backup
//!   was duplicated (one per cluster stored, one job per cluster seen by the agents).
//!
//! `FERRY_SCALE_COORDINATOR_ARGS` adds coordinator flags (space-separated, e.g. `--max-concurrent-backups 64`).
//!
//! Needs `etcd` (tests/setup.sh). Prints a table; it is a benchmark, never a pass/fail test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_common::backoff::Backoff;
use ferry_common::config::FerryConfig;
use ferry_common::protocol::{
    expect_frame, write_frame, AdminRequest, AdminResponse, AgentMsg, EtcdFacts, HashKvReply, HashKvResult, Intent,
    JobRequest,
};
use ferry_common::resources::{EtcdManualBackupSpec, Resource, ResourceType, Spec, Timestamp};
use ferry_common::tls::{quinn_agent_config, quinn_client_config};
use ferry_tests::bench::{release_bin, Proc};
use ferry_tests::wire::{admin_call, answer_hash_kv, etcd_snapshot, open_link, PreparedSnapshot};
use tokio::task::JoinSet;

/// Agents per cluster.
const MEMBERS: usize = 3;
/// How often an agent reports, as `ferry-agent` does.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// `ferry-agent`'s reconnect backoff (agent/src/link.rs), so a restart sees the same reconnect storm.
const RECONNECT_BACKOFF: Backoff = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(30), jitter: 0.5 };
/// Quinn endpoints (UDP sockets) the simulated agents share.
const ENDPOINTS: usize = 4;
/// Certificates issued at once (the coordinator allows 16 connections per identity).
const ISSUE_CONCURRENCY: usize = 8;
/// Steady-state window over which the coordinator's CPU time is measured.
const CPU_WINDOW: Duration = Duration::from_secs(30);
/// Longest wait for any phase (connecting, a backup round, a restart).
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// The member check's hash of every simulated member: all agree.
const KV_HASH: u32 = 0x5ca1e;

fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One real etcd snapshot of an empty single-member etcd, taken once.
async fn empty_etcd_snapshot(dir: &Path) -> Result<Vec<u8>> {
    let (client, peer) = (free_tcp_port()?, free_tcp_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let _etcd = Proc(
        Command::new("etcd")
            .args(["--name", "snap", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("snap={peer_url}")])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start etcd (tests/setup.sh installs it)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match etcd_snapshot(&client_url).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e.context("etcd snapshot")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The coordinator under test.
struct Coordinator {
    proc: Option<Proc>,
    args: Vec<String>,
    dir: PathBuf,
    addr: String,
}

impl Coordinator {
    fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join("store"))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let args = vec![
            "--state-dir".to_owned(),
            dir.join("state").display().to_string(),
            "--listen".to_owned(),
            addr.clone(),
            "--backup-store".to_owned(),
            "local".to_owned(),
            "--local-store-dir".to_owned(),
            dir.join("store").display().to_string(),
        ];
        // FERRY_SCALE_COORDINATOR_ARGS: extra flags, space-separated (e.g. `--max-concurrent-backups 64`).
        let mut args = args;
        args.extend(
            std::env::var("FERRY_SCALE_COORDINATOR_ARGS").unwrap_or_default().split_whitespace().map(str::to_owned),
        );
        let mut c = Self { proc: None, args, dir: dir.to_owned(), addr };
        c.spawn()?;
        Ok(c)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("coordinator.log"))?;
        let child = Command::new(release_bin("ferry-coordinator")?)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start ferry-coordinator")?;
        self.proc = Some(Proc(child));
        Ok(())
    }

    fn pid(&self) -> Result<u32> {
        Ok(self.proc.as_ref().context("coordinator not running")?.0.id())
    }

    fn ferryconfig(&self) -> PathBuf {
        self.dir.join("state").join("admin.ferryconfig")
    }

    /// SIGTERM, wait for the exit, start again on the same state.
    fn restart(&mut self) -> Result<()> {
        let pid = self.pid()?;
        Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        if let Some(mut p) = self.proc.take() {
            p.0.wait()?;
        }
        self.spawn()
    }

    /// (CPU seconds used so far, RSS in MiB).
    fn usage(&self) -> Result<(f64, f64)> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("/proc/PID/stat format")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("VmRSS")?
            .parse()?;
        Ok((ticks / clock_ticks()?, rss_kib / 1024.0))
    }
}

fn clock_ticks() -> Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// What the simulated agents saw.
#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    hash_kv: AtomicU64,
    /// Per cluster: when each backup job arrived.
    jobs: Mutex<HashMap<usize, Vec<Instant>>>,
    committed: AtomicU64,
    failed: AtomicU64,
}

/// A simulated agent: one member of one cluster with its own certificate.
struct SimAgent {
    cluster: usize,
    member: usize,
    config: quinn::ClientConfig,
}

impl SimAgent {
    fn facts(&self) -> EtcdFacts {
        let cluster_id = 0x1000 + self.cluster as u64;
        let member_id = cluster_id * 16 + self.member as u64;
        EtcdFacts {
            member_id,
            cluster_id,
            etcd_version: "3.5.21".into(),
            db_size: 20480,
            raft_applied_index: 100,
            revision: 1,
            leader: self.member == 0,
            leader_id: cluster_id * 16,
            error: None,
            hashed_compactions: Vec::new(),
        }
    }
}

struct Shared {
    coordinator: String,
    snapshot: PreparedSnapshot,
    stats: Stats,
}

/// Runs one agent forever: connect, report every 10 s, answer jobs, reconnect with the agent's backoff.
async fn run_agent(agent: SimAgent, endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        if link(&agent, &endpoint, &shared).await {
            failures = 0;
        }
        tokio::time::sleep(RECONNECT_BACKOFF.delay(failures)).await;
        failures = failures.saturating_add(1);
    }
}

/// One link until it breaks; whether it was established.
async fn link(agent: &SimAgent, endpoint: &quinn::Endpoint, shared: &Arc<Shared>) -> bool {
    let Ok((conn, mut control, _recv)) =
        open_link(endpoint, agent.config.clone(), &shared.coordinator, Intent::AgentLink).await
    else {
        return false;
    };
    shared.stats.connected.fetch_add(1, Ordering::Relaxed);
    let facts = agent.facts();
    let mut reports = tokio::time::interval(REPORT_EVERY);
    let mut jobs = JoinSet::new();
    loop {
        tokio::select! {
            _ = reports.tick() => {
                if write_frame(&mut control, &AgentMsg::Report(facts.clone())).await.is_err() {
                    break;
                }
            }
            stream = conn.accept_bi() => {
                let Ok((send, recv)) = stream else { break };
                jobs.spawn(job(agent.cluster, facts.clone(), send, recv, shared.clone()));
            }
        }
    }
    shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
    true
}

async fn job(
    cluster: usize,
    facts: EtcdFacts,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
) {
    let stats = &shared.stats;
    let Ok(request) = expect_frame::<_, JobRequest>(&mut recv).await else { return };
    match request {
        JobRequest::HashKv { revision } => {
            stats.hash_kv.fetch_add(1, Ordering::Relaxed);
            let result = HashKvResult::Hash { hash: KV_HASH, compact_revision: 0 };
            let reply = HashKvReply {
                member_id: facts.member_id,
                cluster_id: facts.cluster_id,
                current_revision: revision.max(facts.revision),
                db_size: facts.db_size,
                result,
            };
            let _ = answer_hash_kv(&mut send, &reply).await;
        }
        JobRequest::Backup(_) => {
            stats.jobs.lock().unwrap_or_else(|e| e.into_inner()).entry(cluster).or_default().push(Instant::now());
            match shared.snapshot.send(facts, &mut send, &mut recv).await {
                Ok(true) => stats.committed.fetch_add(1, Ordering::Relaxed),
                _ => stats.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        // Neither renewal, restores nor the change log happen in this bench.
        JobRequest::RenewCredentials | JobRequest::Restore(_) | JobRequest::Watch(_) => {}
    }
}

/// The admin side: the coordinator's admin config on a shared endpoint.
struct Admin {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    ca_pem: String,
    coordinator: String,
}

impl Admin {
    fn new(path: &Path, coordinator: &str) -> Result<Self> {
        let cfg = FerryConfig::load(path)?;
        let config = quinn_client_config(&cfg.ca, &cfg.client_pem())?;
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        Ok(Self { endpoint, config, ca_pem: cfg.ca, coordinator: coordinator.to_owned() })
    }

    async fn call(&self, request: &AdminRequest) -> Result<AdminResponse> {
        match admin_call(&self.endpoint, self.config.clone(), &self.coordinator, request).await? {
            AdminResponse::Error { kind, message } => bail!("{kind:?}: {message}"),
            r => Ok(r),
        }
    }

    async fn list(&self, rt: ResourceType) -> Result<Vec<Resource>> {
        match self.call(&AdminRequest::Get { rt, id: None, selector: None }).await? {
            AdminResponse::Resources(r) => Ok(r),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    async fn connected_agents(&self) -> Result<usize> {
        let agents = self.list(ResourceType::Agent).await?;
        Ok(agents.iter().filter(|r| matches!(&r.spec, Spec::Agent(a) if a.connected)).count())
    }

    /// A certificate for `cluster`/`member`, as a client config.
    async fn issue(&self, cluster: &str, member: &str) -> Result<quinn::ClientConfig> {
        let request = AdminRequest::AgentCredentials {
            cluster: cluster.into(),
            member: member.into(),
            valid_for_seconds: 86_400,
        };
        match self.call(&request).await? {
            AdminResponse::Credentials { cert_pem, key_pem, .. } => {
                Ok(quinn_agent_config(&self.ca_pem, &ferry_common::tls::CertifiedPem { cert_pem, key_pem })?)
            }
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

fn cluster_name(i: usize) -> String {
    format!("c{i:05}")
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > PHASE_TIMEOUT {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

/// One row of the table.
#[derive(Debug, Default)]
struct Row {
    agents: usize,
    issue_s: f64,
    connect_s: f64,
    rss_mib: f64,
    cpu_pct: f64,
    get_agents_s: f64,
    apply_s: f64,
    dispatch_s: f64,
    complete_s: f64,
    failed: u64,
    reconnect_s: f64,
    rss_after_mib: f64,
    stored: usize,
    jobs: usize,
}

async fn ferryctl_get_agents(config: &Path) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let out = tokio::process::Command::new(release_bin("ferryctl")?)
            .arg("--ferryconfig")
            .arg(config)
            .args(["get", "agents"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await?;
        if !out.status.success() {
            bail!("ferryctl get agents: {}", String::from_utf8_lossy(&out.stderr));
        }
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

async fn measure(agents: usize, raw_snapshot: &[u8], root: &Path) -> Result<Row> {
    let clusters = agents / MEMBERS;
    let agents = clusters * MEMBERS;
    let mut row = Row { agents, ..Row::default() };
    let dir = root.join(format!("n{agents}"));
    let mut coordinator = Coordinator::start(&dir)?;
    let config = coordinator.ferryconfig();
    wait_for("the admin ferryconfig", || config.is_file()).await?;
    let admin = Arc::new(Admin::new(&config, &coordinator.addr)?);
    let start = Instant::now();
    while let Err(e) = admin.list(ResourceType::Agent).await {
        if start.elapsed() > PHASE_TIMEOUT {
            bail!("the coordinator did not answer: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Certificates, issued and recorded by the coordinator.
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut issuers = JoinSet::new();
    for _ in 0..ISSUE_CONCURRENCY {
        let (admin, next) = (admin.clone(), next.clone());
        issuers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= agents {
                    return anyhow::Ok(out);
                }
                let (cluster, member) = (i / MEMBERS, i % MEMBERS);
                let config = admin.issue(&cluster_name(cluster), &format!("m{member}")).await?;
                out.push(SimAgent { cluster, member, config });
            }
        });
    }
    let mut sims = Vec::new();
    while let Some(r) = issuers.join_next().await {
        sims.extend(r??);
    }
    row.issue_s = start.elapsed().as_secs_f64();
    eprintln!("{agents} agents: {} certificates issued in {:.1}s", sims.len(), row.issue_s);

    // Connect everyone.
    let shared = Arc::new(Shared {
        coordinator: coordinator.addr.clone(),
        snapshot: PreparedSnapshot::new(raw_snapshot, 3)?,
        stats: Stats::default(),
    });
    let bind: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let endpoints: Vec<quinn::Endpoint> =
        (0..ENDPOINTS).map(|_| quinn::Endpoint::client(bind)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut running = JoinSet::new();
    for (i, sim) in sims.into_iter().enumerate() {
        running.spawn(run_agent(sim, endpoints[i % ENDPOINTS].clone(), shared.clone()));
    }
    let stats = &shared.stats;
    wait_for("every agent to connect", || stats.connected.load(Ordering::Relaxed) == agents).await?;
    while admin.connected_agents().await? < agents {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    row.connect_s = start.elapsed().as_secs_f64();
    eprintln!("{agents} agents: all connected in {:.1}s", row.connect_s);

    // Steady state: one report cycle to settle, then the CPU window.
    tokio::time::sleep(REPORT_EVERY + Duration::from_secs(2)).await;
    let (cpu0, _) = coordinator.usage()?;
    let t0 = Instant::now();
    tokio::time::sleep(CPU_WINDOW).await;
    let (cpu1, rss) = coordinator.usage()?;
    row.cpu_pct = 100.0 * (cpu1 - cpu0) / t0.elapsed().as_secs_f64();
    row.rss_mib = rss;
    row.get_agents_s = ferryctl_get_agents(&config).await?;
    eprintln!("{agents} agents: steady CPU {:.1}% RSS {:.0} MiB get agents {:.2}s", row.cpu_pct, rss, row.get_agents_s);

    // A round of manual backups to every cluster, in one apply.
    let now = Timestamp { nanos: 0, ..Timestamp::now() };
    let resources: Vec<Resource> = (0..clusters)
        .map(|c| Resource::new(cluster_name(c), Spec::EtcdManualBackup(EtcdManualBackupSpec { backupat: now })))
        .collect();
    let start = Instant::now();
    admin.call(&AdminRequest::Apply { resources }).await?;
    row.apply_s = start.elapsed().as_secs_f64();
    let jobs_seen = || stats.jobs.lock().unwrap_or_else(|e| e.into_inner()).len();
    row.dispatch_s = wait_for("every cluster's job", || jobs_seen() == clusters).await?.as_secs_f64();
    let done = || stats.committed.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed) >= clusters as u64;
    wait_for("every backup to finish", done).await?;
    row.complete_s = start.elapsed().as_secs_f64();
    row.failed = stats.failed.load(Ordering::Relaxed);
    eprintln!(
        "{agents} agents: round applied in {:.1}s, dispatched in {:.1}s, done in {:.1}s",
        row.apply_s, row.dispatch_s, row.complete_s
    );

    // Restart: every agent reconnects at once.
    coordinator.restart()?;
    let start = Instant::now();
    wait_for("the agents to notice the restart", || stats.connected.load(Ordering::Relaxed) < agents).await?;
    wait_for("every agent to reconnect", || stats.connected.load(Ordering::Relaxed) == agents).await?;
    while admin.connected_agents().await.unwrap_or(0) < agents {
        if start.elapsed() > PHASE_TIMEOUT {
            bail!("the coordinator does not list every agent as connected");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    row.reconnect_s = start.elapsed().as_secs_f64();
    // Long enough for a wrongly rescheduled backup to start.
    tokio::time::sleep(Duration::from_secs(15)).await;
    row.rss_after_mib = coordinator.usage()?.1;
    row.stored = admin.list(ResourceType::EtcdBackup).await?.len();
    row.jobs = stats.jobs.lock().unwrap_or_else(|e| e.into_inner()).values().map(Vec::len).sum();
    eprintln!("{agents} agents: back in {:.1}s; {} stored, {} jobs", row.reconnect_s, row.stored, row.jobs);
    running.shutdown().await;
    for e in endpoints {
        e.close(0u32.into(), b"done");
    }
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("FERRY_SCALE_AGENTS")
        .unwrap_or_else(|_| "999,3000,9999".into())
        .split(',')
        .map(|s| s.trim().parse().context("FERRY_SCALE_AGENTS: comma-separated agent counts"))
        .collect::<Result<_>>()?;
    let root = tempfile::tempdir()?;
    let raw = empty_etcd_snapshot(root.path()).await?;
    eprintln!("snapshot: {} bytes from an empty etcd", raw.len());
    let mut rows = Vec::new();
    for n in sizes {
        rows.push(measure(n, &raw, root.path()).await?);
    }
    println!(
        "| agents | issue certs | all connected | coord RSS | coord CPU (steady) | `get agents` | round applied | round dispatched | round done (failed) | restart: all back | RSS after | backups stored / jobs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.1} s | {:.1} s | {:.0} MiB | {:.1} % | {:.2} s | {:.2} s | {:.2} s | {:.1} s ({}) | {:.1} s | {:.0} MiB | {} / {} |",
            r.agents,
            r.issue_s,
            r.connect_s,
            r.rss_mib,
            r.cpu_pct,
            r.get_agents_s,
            r.apply_s,
            r.dispatch_s,
            r.complete_s,
            r.failed,
            r.reconnect_s,
            r.rss_after_mib,
            r.stored,
            r.jobs
        );
    }
    Ok(())
}
