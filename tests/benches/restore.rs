//! Restore benchmark: the orchestrated restore of a whole cluster (`ferryctl restore`) against the manual
//! per-node procedure and against the bare floor of etcd's own tools, on the same data, in one run.
//!
//! `cargo build --release --bins && cargo bench -p ferry-tests --bench restore`
//!
//! For each database size (default 100 MiB and 1 GiB; `FERRY_BENCH_SIZES_MIB=100,1024` picks others) it starts
//! a 3-member etcd cluster on loopback, every member under the release `ferry-agent gate` (its own data dir,
//! gate dir and ports, etcd's default heartbeat and election timings), a release coordinator with the local
//! store and one release agent per member with the gate flags (`--gate-dir --data-dir --restore-client-url`).
//! It fills etcd with Kubernetes-like objects that are about half compressible (each object carries as many
//! bytes of random base64 as the rest of it; the ratio measured is printed) until etcd's database reaches the
//! size, takes one manual backup (`ferryctl backup now --wait`), and times, each from the same backup:
//! 1. the floor: `etcdutl snapshot restore` of the downloaded, decompressed snapshot for one member (the
//!    download and `zstd -d` are not timed), plus starting a 3-member cluster on restored data until every
//!    member answers a linearizable read;
//! 2. `ferryctl restore CLUSTER --backup ID --mode all-members --yes --wait`, from the command's start to its
//!    exit (done = verified and serving), with the CPU seconds of the coordinator and the agents (their
//!    children, `etcdutl`, included) and the agents' peak RSS during the restore;
//! 3. the same with `--mode seed-join` (the default);
//! 4. the manual path of docs/RESTORE.md: stop every member and agent (the static pods moved out), then
//!    `ferry-agent restore … --force` per member one after another (an operator on three nodes, in the
//!    runbook's order), then start the members until all serve;
//! 5. the same with the three `ferry-agent restore` runs in parallel.
//!
//! After each method it checks that every member serves the backup's key count on its own client URL, waits
//! for the backup the coordinator takes after an orchestrated restore, deletes what restores moved aside
//! (`.ferry-old-*`) and `sync`s, so that no method pays for another's writeback. The phases of each
//! orchestrated restore (from the coordinator's and the agents' logs) go to stderr: where the time went. An
//! orchestrated restore that fails is a row of its own (its wall time until it failed) and is tried again, at
//! most 3 times, once an untimed all-members restore brought the cluster back; a failed backup after a restore
//! is reported and waited for like a stored one (both happen: docs/PERFORMANCE.md, "Orchestrated restore").
//!
//! Runs on etcd 3.5 from `.tools/etcd-3.5` (`tests/setup.sh`; `FERRY_ETCD_DIR` picks another). Needs the
//! release binaries in target/release and `zstd`. Temp dirs under $TMPDIR (`FERRY_BENCH_KEEP=1` keeps them).
//! Prints a table; it is a benchmark, never a pass/fail test.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, ConnectOptions, GetOptions};
use ferry_tests::bench::fill::{fill, HALF_BLOB};
use ferry_tests::bench::{cpu_seconds, etcd_dir, proc_stats, release_bin, use_etcd_under_test, Proc};
use serde_json::Value;

const CLUSTER: &str = "bench";
const MEMBERS: usize = 3;
/// etcd's quota, raised: the default 2 GiB would be near for the largest size once restored with history.
const QUOTA_BYTES: &str = "8589934592";
/// How long a member may take to serve after it was started.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the gate may take to stop etcd on SIGTERM (its own stop timeout is 30 s, then SIGKILL).
const GATE_STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// The bump the floor's `etcdutl` restores with: what the coordinator's plan gives a cluster seen at a
/// revision below 1 000 000 (`max(10 %, 100 000)` above it).
const FLOOR_BUMP: &str = "100000";
/// How often an orchestrated restore that failed is tried again.
const ORCHESTRATED_TRIES: usize = 3;

fn main() -> Result<()> {
    let etcd = use_etcd_under_test()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cores} cores; {etcd}");
    let sizes: Vec<u64> = std::env::var("FERRY_BENCH_SIZES_MIB")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1024]);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for mib in sizes {
        let mut bench = Bench::start(&rt, mib)?;
        let r = bench.run();
        data.push(bench.data.clone());
        bench.teardown();
        rows.extend(r?);
    }
    print_table(&rows, &data, cores);
    Ok(())
}

/// One etcd member of the bench's cluster: its name, ports, dirs, and the gate running it.
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    gate_dir: PathBuf,
    log: PathBuf,
    /// The agent's `--restore-client-url`.
    restore_url: String,
    creds: PathBuf,
    gate: Option<Gate>,
}

/// `ferry-agent gate … -- etcd …`: stopped with SIGTERM (the gate stops etcd, then exits), as the kubelet
/// stops a static pod; SIGKILL would leave etcd running.
struct Gate(Child);

impl Gate {
    fn stop(mut self) -> Result<()> {
        let pid = self.0.id();
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + GATE_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.0.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the gate {pid} did not stop etcd within {GATE_STOP_TIMEOUT:?}")
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let deadline = Instant::now() + GATE_STOP_TIMEOUT;
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The data the sizes were measured on.
#[derive(Clone, Default)]
struct Data {
    /// etcd's DB size (member 1) after the fill.
    db: u64,
    keys: u64,
    /// The backup: etcd's snapshot size and the stored (zstd) size.
    rawsize: u64,
    stored: u64,
}

struct Bench<'r> {
    rt: &'r tokio::runtime::Runtime,
    mib: u64,
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    coordinator: Option<Proc>,
    agents: Vec<Proc>,
    addr: String,
    config: PathBuf,
    data: Data,
    /// The key count every member must serve after a restore.
    keys: u64,
    /// Runs so far (log names, tokens).
    seq: usize,
}

/// One row of the table.
struct Row {
    mib: u64,
    method: String,
    wall: Duration,
    /// CPU seconds of Ferry's processes (coordinator and agents, or `ferry-agent restore`) and their children.
    cpu: Option<f64>,
    /// Peak RSS of an agent (the largest), or of a `ferry-agent restore` (the largest).
    rss: Option<u64>,
    /// Whether this is the floor the others are compared with.
    floor: bool,
    /// Whether the restore failed (the wall time is until it did).
    failed: bool,
    note: String,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("open {}", path.display()))
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    let f = log_file(log)?;
    cmd.stdout(Stdio::from(f.try_clone()?)).stderr(Stdio::from(f)).stdin(Stdio::null());
    cmd.spawn().with_context(|| format!("spawn {cmd:?}"))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sync() -> Result<()> {
    run(&mut Command::new("sync")).map(drop)
}

/// The last `n` lines of a log, for errors.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Seconds since the epoch, now (to match log timestamps against).
fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing writes it (`2026-12-07T01:02:03.456789Z`).
fn parse_ts(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days since the epoch of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Peak RSS of the process, then its peak reset (`clear_refs` 5), so that the next reading covers what came
/// after.
fn take_peak_rss(pid: u32) -> u64 {
    let (rss, _) = proc_stats(pid);
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    rss
}

/// CPU seconds of a running process and of its waited-for children.
fn cpu_with_children(pid: u32) -> f64 {
    let pid = pid.to_string();
    cpu_seconds(&pid, false) + cpu_seconds(&pid, true)
}

/// Runs the commands at once; returns the wall time until the last ended, the peak RSS of the largest (read
/// every 20 ms) and their CPU seconds (with their children's). A command that fails fails the lot, its log's
/// tail in the error.
fn run_watched(cmds: Vec<(Command, PathBuf)>) -> Result<(Duration, u64, f64)> {
    let cpu_before = cpu_seconds("self", true);
    let t = Instant::now();
    let mut children = Vec::new();
    for (mut cmd, log) in cmds {
        children.push((Proc(spawn(&mut cmd, &log)?), log, None));
    }
    let mut peak = 0;
    loop {
        let mut running = 0;
        for (child, log, status) in children.iter_mut() {
            if status.is_some() {
                continue;
            }
            peak = peak.max(proc_stats(child.0.id()).0);
            match child.0.try_wait()? {
                Some(s) if !s.success() => bail!("{} failed ({s}):\n{}", log.display(), tail(log, 30)),
                Some(s) => *status = Some(s),
                None => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((t.elapsed(), peak, cpu_seconds("self", true) - cpu_before))
}

/// A client of one etcd member, with short timeouts.
async fn connect(url: &str) -> Result<Client> {
    let options =
        ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(10));
    Client::connect([url], Some(options)).await.with_context(|| format!("connect to {url}"))
}

/// Waits until every member answers a linearizable read (up and with a leader), polling every 50 ms.
async fn wait_healthy(urls: &[String]) -> Result<()> {
    let deadline = Instant::now() + HEALTHY_TIMEOUT;
    for url in urls {
        loop {
            let ok = async {
                let mut c = connect(url).await?;
                tokio::time::timeout(Duration::from_secs(2), c.get("ferry-bench-health", None)).await??;
                anyhow::Ok(())
            }
            .await;
            if ok.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd at {url} did not become healthy within {HEALTHY_TIMEOUT:?}: {ok:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The member's key count (serializable: its own data) and DB size.
async fn keys_and_db(url: &str) -> Result<(u64, u64)> {
    let mut c = connect(url).await?;
    let n = c.get("", Some(GetOptions::new().with_all_keys().with_count_only().with_serializable())).await?.count();
    let db = c.status().await?.db_size();
    Ok((u64::try_from(n)?, u64::try_from(db)?))
}

/// etcd's arguments for a member of a cluster bootstrapped as `initial_cluster` with `token`.
fn etcd_args(name: &str, client: &str, peer: &str, data_dir: &Path, initial_cluster: &str, token: &str) -> Vec<String> {
    let data_dir = data_dir.display().to_string();
    [
        "--name",
        name,
        "--data-dir",
        &data_dir,
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-token",
        token,
        "--initial-cluster-state",
        "new",
        "--quota-backend-bytes",
        QUOTA_BYTES,
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

impl<'r> Bench<'r> {
    /// The cluster, the coordinator and the agents, filled to `mib` and backed up once.
    fn start(rt: &'r tokio::runtime::Runtime, mib_: u64) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferry-bench-restore-{}-{mib_}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut members = Vec::new();
        let mut peers = Vec::new();
        for i in 1..=MEMBERS {
            let (client, peer) = (free_port()?, free_port()?);
            let name = format!("m{i}");
            peers.push(format!("{name}=http://127.0.0.1:{peer}"));
            members.push(Member {
                client_url: format!("http://127.0.0.1:{client}"),
                peer_url: format!("http://127.0.0.1:{peer}"),
                data_dir: dir.join(format!("{name}.etcd")),
                gate_dir: dir.join(format!("{name}.gate")),
                log: dir.join(format!("etcd-{name}.log")),
                restore_url: format!("http://127.0.0.1:{}", free_port()?),
                creds: dir.join(format!("creds-{name}")),
                name,
                gate: None,
            });
        }
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut b = Bench {
            rt,
            mib: mib_,
            config: dir.join("state/admin.ferryconfig"),
            dir,
            members,
            initial_cluster: peers.join(","),
            coordinator: None,
            agents: Vec::new(),
            addr,
            data: Data::default(),
            keys: 0,
            seq: 0,
        };
        eprintln!("[{mib_} MiB] starting 3 gated etcd members, the coordinator and 3 agents in {}", b.dir.display());
        for i in 0..MEMBERS {
            b.start_gate(i)?;
        }
        rt.block_on(wait_healthy(&b.client_urls()))?;
        b.start_coordinator()?;
        for m in &b.members {
            b.ctl(&[
                "agent-credentials",
                "--cluster",
                CLUSTER,
                "--member",
                &m.name,
                "--out",
                &m.creds.to_string_lossy(),
            ])?;
        }
        b.start_agents()?;
        b.fill()?;
        Ok(b)
    }

    fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    fn start_gate(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let etcd = etcd_dir().join("etcd");
        let args = etcd_args(&m.name, &m.client_url, &m.peer_url, &m.data_dir, &self.initial_cluster, "bench");
        let mut cmd = Command::new(release_bin("ferry-agent")?);
        cmd.arg("gate").arg("--gate-dir").arg(&m.gate_dir).arg("--data-dir").arg(&m.data_dir).arg("--").arg(etcd);
        cmd.args(args).env("NO_COLOR", "1");
        let child = spawn(&mut cmd, &m.log)?;
        self.members[i].gate = Some(Gate(child));
        Ok(())
    }

    fn stop_gates(&mut self) -> Result<()> {
        for m in &mut self.members {
            if let Some(g) = m.gate.take() {
                g.stop()?;
            }
        }
        Ok(())
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        run(Command::new(release_bin("ferryctl")?)
            .env("NO_COLOR", "1")
            .arg("--ferryconfig")
            .arg(&self.config)
            .args(args))
    }

    fn ctl_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.ctl(args)?;
        serde_json::from_str(&out).with_context(|| format!("ferryctl {args:?} printed no JSON: {out}"))
    }

    fn start_coordinator(&mut self) -> Result<()> {
        let mut cmd = Command::new(release_bin("ferry-coordinator")?);
        cmd.arg("--state-dir").arg(self.dir.join("state")).args(["--listen", &self.addr, "--log-format", "json"]);
        self.coordinator = Some(Proc(spawn(&mut cmd, &self.dir.join("coordinator.log"))?));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctl(&["get", "agents"]).is_err() {
            if Instant::now() > deadline {
                bail!("the coordinator did not come up:\n{}", tail(&self.dir.join("coordinator.log"), 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// One agent per member with the gate flags; etcd's stream read uncapped (the backup is not measured).
    fn start_agents(&mut self) -> Result<()> {
        self.agents.clear();
        for m in &self.members {
            let mut cmd = Command::new(release_bin("ferry-agent")?);
            // As deploy/Containerfile and the systemd unit run it.
            cmd.env("MALLOC_MMAP_THRESHOLD_", "1048576").env("NO_COLOR", "1");
            cmd.args(["--log-format", "json", "--coordinator", &self.addr, "--credentials"])
                .arg(&m.creds)
                .args(["--etcd-endpoints", &m.client_url, "--gate-dir"])
                .arg(&m.gate_dir)
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--restore-client-url", &m.restore_url, "--etcd-read-limit-mibps", "0"]);
            self.agents.push(Proc(spawn(&mut cmd, &self.dir.join(format!("agent-{}.log", m.name)))?));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.ctl_json(&["get", "agents", "-o", "json"])?;
            let ready = v.as_array().map_or(0, |a| {
                a.iter().filter(|a| a["spec"]["connected"] == true && a["spec"]["dbsize"].as_i64() > Some(0)).count()
            });
            if ready == MEMBERS {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{ready} of {MEMBERS} agents connected; see {}/agent-*.log", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop_agents(&mut self) {
        self.agents.clear();
    }

    /// Fills etcd until its DB reaches the size, then takes the backup every method restores.
    fn fill(&mut self) -> Result<()> {
        let target = self.mib << 20;
        let url = self.members[0].client_url.clone();
        let t = Instant::now();
        let (mut first, mut written) = (0, 0);
        loop {
            let (_, db) = self.rt.block_on(keys_and_db(&url))?;
            if db >= target - target / 50 {
                break;
            }
            // etcd's keys are revisions, written in order: the DB grows by about what is written.
            let chunk = ((target - db) as f64 * 0.9) as u64;
            let filled = self.rt.block_on(fill(&url, chunk.max(1 << 20), HALF_BLOB, first))?;
            first = filled.next;
            written += filled.written;
        }
        let (keys, db) = self.rt.block_on(keys_and_db(&url))?;
        eprintln!(
            "[{} MiB] wrote {} MiB in {keys} keys in {:.1} s; etcd's DB is {} MiB",
            self.mib,
            mib(written),
            t.elapsed().as_secs_f64(),
            mib(db)
        );
        self.keys = keys;
        // The coordinator refuses a snapshot over twice the members' reported DB size; they report every 10 s,
        // and a fill this fast outruns the reports.
        std::thread::sleep(std::time::Duration::from_secs(11));
        let t = Instant::now();
        self.ctl(&["backup", "now", CLUSTER, "--wait", "--timeout", "30m"])?;
        let b = self.newest_backup()?;
        let (rawsize, stored) = (b["spec"]["rawsize"].as_u64().unwrap_or(0), b["spec"]["size"].as_u64().unwrap_or(0));
        eprintln!(
            "[{} MiB] backup {} in {:.1} s: {} MiB of snapshot stored as {} MiB (zstd {:.2}×)",
            self.mib,
            b["metadata"]["id"],
            t.elapsed().as_secs_f64(),
            mib(rawsize),
            mib(stored),
            rawsize as f64 / stored.max(1) as f64
        );
        self.data = Data { db, keys, rawsize, stored };
        Ok(())
    }

    fn newest_backup(&self) -> Result<Value> {
        let list = self.ctl_json(&["get", "etcdbackup", "-o", "json"])?;
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["spec"]["cluster"] == CLUSTER)
            .max_by_key(|b| b["spec"]["createdat"]["seconds"].as_i64().unwrap_or(0))
            .cloned()
            .context("no backup")
    }

    fn run(&mut self) -> Result<Vec<Row>> {
        let backup = self.newest_backup()?;
        let id = backup["metadata"]["id"].as_str().context("backup id")?.to_owned();
        let mut rows = self.floor(&id)?;
        let runs: usize = std::env::var("FERRY_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        for _ in 0..runs {
            for mode in ["all-members", "seed-join"] {
                // A restore that fails is a row of its own, and tried again (at most ORCHESTRATED_TRIES times)
                // once the cluster is brought back by an all-members restore that is not timed.
                for _ in 0..ORCHESTRATED_TRIES {
                    let row = self.orchestrated(&id, mode)?;
                    let failed = row.failed;
                    rows.push(row);
                    if !failed {
                        break;
                    }
                    eprintln!("[{} MiB] bringing the cluster back (all-members, not timed)…", self.mib);
                    self.ctl(&["restore", CLUSTER, "--backup", &id, "--mode", "all-members", "--yes", "--wait"])?;
                    self.wait_backup_of_restored()?;
                    self.settle()?;
                }
                self.settle()?;
            }
            for parallel in [false, true] {
                rows.push(self.manual(&id, parallel)?);
                self.settle()?;
            }
            // The orchestrated restores of the next round need the agents back.
            self.start_agents()?;
        }
        Ok(rows)
    }

    /// After a method: every member serves the backup's keys, what restores moved aside is deleted, and the
    /// disk has written everything back.
    fn settle(&mut self) -> Result<()> {
        let urls = self.client_urls();
        self.rt.block_on(wait_healthy(&urls))?;
        for url in &urls {
            let (keys, _) = self.rt.block_on(keys_and_db(url))?;
            if keys != self.keys {
                bail!("{url} serves {keys} keys after the restore, the backup holds {}", self.keys);
            }
        }
        for m in &self.members {
            for e in std::fs::read_dir(&m.data_dir)? {
                let e = e?;
                if e.file_name().to_string_lossy().starts_with(".ferry-old") {
                    std::fs::remove_dir_all(e.path())?;
                }
            }
        }
        sync()?;
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    }

    /// The floor: one member's `etcdutl snapshot restore` of the decompressed snapshot, and a 3-member
    /// cluster started on restored data until it serves.
    fn floor(&mut self, id: &str) -> Result<Vec<Row>> {
        let dir = self.dir.join("floor");
        std::fs::create_dir_all(&dir)?;
        let zst = dir.join("backup.snapshot.zst");
        let db = dir.join("snapshot.db");
        self.ctl(&["backup", "download", CLUSTER, id, "-o", &zst.to_string_lossy()])?;
        run(Command::new("zstd").args(["-d", "-q", "-f"]).arg(&zst).arg("-o").arg(&db))?;
        std::fs::remove_file(&zst)?;
        sync()?;
        let mut peers = Vec::new();
        let mut ports = Vec::new();
        for i in 1..=MEMBERS {
            let (c, p) = (free_port()?, free_port()?);
            peers.push(format!("f{i}=http://127.0.0.1:{p}"));
            ports.push((c, p));
        }
        let initial = peers.join(",");
        let mut restores = Vec::new();
        for (i, (_, p)) in ports.iter().enumerate() {
            let name = format!("f{}", i + 1);
            let mut cmd = Command::new(etcd_dir().join("etcdutl"));
            cmd.args(["snapshot", "restore"])
                .arg(&db)
                .arg("--data-dir")
                .arg(dir.join(format!("{name}.etcd")))
                .args(["--name", &name, "--initial-cluster", &initial, "--initial-cluster-token", "floor"])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
                .args(["--bump-revision", FLOOR_BUMP, "--mark-compacted"]);
            eprintln!("[{} MiB] floor: etcdutl snapshot restore {name}…", self.mib);
            restores.push(run_watched(vec![(cmd, dir.join(format!("etcdutl-{name}.log")))])?);
            // Each restore starts with the previous one's writes on disk.
            sync()?;
        }
        std::fs::remove_file(&db)?;
        sync()?;
        let walls: Vec<String> = restores.iter().map(|r| format!("{:.2}", r.0.as_secs_f64())).collect();
        eprintln!("[{} MiB] floor: etcdutl snapshot restore took {} s", self.mib, walls.join(", "));
        // The first member's restore: on three nodes, the three run at once, each on its own disk.
        let (one, rss, cpu) = restores[0];
        eprintln!("[{} MiB] floor: starting the 3 restored members…", self.mib);
        let t = Instant::now();
        let mut etcds = Vec::new();
        let mut urls = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let name = format!("f{}", i + 1);
            let client = format!("http://127.0.0.1:{c}");
            let peer = format!("http://127.0.0.1:{p}");
            let data_dir = dir.join(format!("{name}.etcd"));
            let mut cmd = Command::new(etcd_dir().join("etcd"));
            cmd.args(etcd_args(&name, &client, &peer, &data_dir, &initial, "floor"));
            etcds.push(Proc(spawn(&mut cmd, &dir.join(format!("etcd-{name}.log")))?));
            urls.push(client);
        }
        self.rt.block_on(wait_healthy(&urls))?;
        let start = t.elapsed();
        for url in &urls {
            let (keys, _) = self.rt.block_on(keys_and_db(url))?;
            if keys != self.keys {
                bail!("the floor's {url} serves {keys} keys, the backup holds {}", self.keys);
            }
        }
        drop(etcds);
        std::fs::remove_dir_all(&dir)?;
        sync()?;
        eprintln!(
            "[{} MiB] floor: {:.2} s etcdutl + {:.2} s cluster start = {:.2} s",
            self.mib,
            one.as_secs_f64(),
            start.as_secs_f64(),
            (one + start).as_secs_f64()
        );
        let row = |method: &str, wall, cpu, rss, floor| Row {
            mib: self.mib,
            method: method.into(),
            wall,
            cpu,
            rss,
            floor,
            note: String::new(),
            failed: false,
        };
        Ok(vec![
            row("etcdutl snapshot restore, one member", one, Some(cpu), Some(rss), false),
            row("start 3 members on restored data → healthy", start, None, None, false),
            row("floor: the two above", one + start, None, None, true),
        ])
    }

    /// `ferryctl restore … --wait` in `mode`, from the command's start to its exit.
    fn orchestrated(&mut self, id: &str, mode: &str) -> Result<Row> {
        self.seq += 1;
        let pids: Vec<u32> = self.agents.iter().map(|a| a.0.id()).collect();
        let coordinator = self.coordinator.as_ref().context("coordinator")?.0.id();
        for pid in pids.iter().chain([&coordinator]) {
            take_peak_rss(*pid);
        }
        let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_with_children(*p)).sum::<f64>();
        let (agents_before, coordinator_before) = (cpu(&pids), cpu(&[coordinator]));
        eprintln!("[{} MiB] ferryctl restore --mode {mode}…", self.mib);
        let started = epoch_now();
        let t = Instant::now();
        let out =
            self.ctl(&["restore", CLUSTER, "--backup", id, "--mode", mode, "--yes", "--wait", "--timeout", "60m"]);
        let wall = t.elapsed();
        if let Err(e) = out {
            self.timeline(started, wall);
            let st = self.ctl_json(&["get", "etcdrestorestatus", CLUSTER, "-o", "json"])?;
            let why = st["spec"]["error"].as_str().unwrap_or("").to_owned();
            eprintln!("[{} MiB] --mode {mode} FAILED after {:.2} s: {e:#}", self.mib, wall.as_secs_f64());
            return Ok(Row {
                mib: self.mib,
                method: format!("ferryctl restore --mode {mode} --wait: FAILED"),
                wall,
                cpu: None,
                rss: None,
                floor: false,
                note: why.chars().take(60).collect(),
                failed: true,
            });
        }
        let agents_cpu = cpu(&pids) - agents_before;
        let coordinator_cpu = cpu(&[coordinator]) - coordinator_before;
        let rss = pids.iter().map(|p| take_peak_rss(*p)).max().unwrap_or(0);
        let coordinator_rss = take_peak_rss(coordinator);
        self.timeline(started, wall);
        eprintln!(
            "[{} MiB] --mode {mode}: {:.2} s; CPU: agents {agents_cpu:.2} s, coordinator {coordinator_cpu:.2} s; peak \
             RSS: agent {} MiB, coordinator {} MiB",
            self.mib,
            wall.as_secs_f64(),
            mib(rss),
            mib(coordinator_rss)
        );
        self.wait_backup_of_restored()?;
        Ok(Row {
            mib: self.mib,
            method: format!("ferryctl restore --mode {mode} --wait"),
            wall,
            cpu: Some(agents_cpu + coordinator_cpu),
            rss: Some(rss),
            floor: false,
            note: format!("agents {agents_cpu:.1} + coordinator {coordinator_cpu:.1}"),
            failed: false,
        })
    }

    /// Waits for the backup the coordinator starts once the restored cluster is reported: not part of the
    /// restore, but it must not run under the next method.
    fn wait_backup_of_restored(&self) -> Result<()> {
        let st = self.ctl_json(&["get", "etcdrestorestatus", CLUSTER, "-o", "json"])?;
        let cluster_id = st["spec"]["verified"]["etcdclusterid"].as_str().context("verified cluster id")?.to_owned();
        let done = st["spec"]["finishedat"]["seconds"].as_i64().context("restore finishedat")?;
        let t = Instant::now();
        let deadline = t + Duration::from_secs(1800);
        loop {
            let list = self.ctl_json(&["get", "etcdbackup", "-o", "json"])?;
            if list.as_array().is_some_and(|a| a.iter().any(|b| b["spec"]["etcdclusterid"] == cluster_id.as_str())) {
                eprintln!(
                    "[{} MiB] the backup after the restore was stored {:.1} s after it",
                    self.mib,
                    t.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            // It may fail (see docs/PERFORMANCE.md, "Orchestrated restore"): then it is over too.
            let b = self.ctl_json(&["get", "etcdbackupstatus", CLUSTER, "-o", "json"])?;
            let attempt = b["spec"]["lastbackupattempt"]["seconds"].as_i64().unwrap_or(0);
            if attempt >= done && b["spec"]["status"].as_i64() == Some(2) {
                eprintln!(
                    "[{} MiB] the backup after the restore FAILED {:.1} s after it: {}",
                    self.mib,
                    t.elapsed().as_secs_f64(),
                    b["spec"]["error"]
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no backup of the restored cluster {cluster_id} within 30 min");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The restore's phases and steps as the coordinator and the agents logged them, seconds after `started`.
    fn timeline(&self, started: f64, wall: Duration) {
        let mut events: Vec<(f64, String)> = Vec::new();
        let mut read = |path: &Path, who: &str| {
            for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                let Some(at) = v["timestamp"].as_str().and_then(parse_ts) else { continue };
                if at < started - 1.0 || at > started + wall.as_secs_f64() + 1.0 {
                    continue;
                }
                let f = &v["fields"];
                let msg = f["message"].as_str().unwrap_or("");
                let keep = [
                    "restore phase",
                    "member step done",
                    "restore planned",
                    "restored cluster verified",
                    "restore done",
                    "etcd is held",
                    "etcd started",
                    "etcd runs with",
                    "added as a learner",
                    "learner promoted",
                    "data dir moved aside",
                    "restoring backup",
                    "backup downloaded",
                    "snapshot restored",
                    "restore complete",
                ];
                if !keep.iter().any(|k| msg.contains(k)) {
                    continue;
                }
                let extra: Vec<String> = f
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| *k != "message")
                    .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                    .collect();
                events.push((at - started, format!("{who}: {msg} {}", extra.join(" "))));
            }
        };
        read(&self.dir.join("coordinator.log"), "coordinator");
        for m in &self.members {
            read(&self.dir.join(format!("agent-{}.log", m.name)), &format!("agent {}", m.name));
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (at, e) in events {
            eprintln!("    {at:>7.2} s  {e}");
        }
    }

    /// The runbook by hand: every member and agent stopped, `ferry-agent restore --force` per member (one after
    /// another, or all at once), every member started until all serve.
    fn manual(&mut self, id: &str, parallel: bool) -> Result<Row> {
        self.seq += 1;
        let how = if parallel { "in parallel" } else { "one after another" };
        eprintln!("[{} MiB] manual: stop, ferry-agent restore ×3 {how}, start…", self.mib);
        let t = Instant::now();
        // The static pods moved out: etcd and its agent sidecar stop together.
        self.stop_agents();
        self.stop_gates()?;
        let stopped = t.elapsed();
        let token = format!("bench-manual-{}", self.seq);
        let cmds: Vec<(Command, PathBuf)> = self
            .members
            .iter()
            .map(|m| {
                let mut cmd = Command::new(release_bin("ferry-agent")?);
                cmd.env("MALLOC_MMAP_THRESHOLD_", "1048576").env("NO_COLOR", "1");
                cmd.args(["restore", "--coordinator", &self.addr, "--credentials"])
                    .arg(&m.creds)
                    .args(["--backup", id, "--data-dir"])
                    .arg(&m.data_dir)
                    .args(["--force", "--name", &m.name, "--initial-cluster", &self.initial_cluster])
                    .args(["--initial-cluster-token", &token, "--initial-advertise-peer-urls", &m.peer_url]);
                Ok((cmd, self.dir.join(format!("restore-{}-{}.log", m.name, self.seq))))
            })
            .collect::<Result<_>>()?;
        let (mut restore_wall, mut rss, mut cpu) = (Duration::ZERO, 0, 0.0);
        let mut each = Vec::new();
        if parallel {
            (restore_wall, rss, cpu) = run_watched(cmds)?;
        } else {
            for c in cmds {
                let (w, r, c) = run_watched(vec![c])?;
                each.push(format!("{:.2}", w.as_secs_f64()));
                (restore_wall, rss, cpu) = (restore_wall + w, rss.max(r), cpu + c);
            }
        }
        let s = Instant::now();
        for i in 0..MEMBERS {
            self.start_gate(i)?;
        }
        self.rt.block_on(wait_healthy(&self.client_urls()))?;
        let start = s.elapsed();
        let wall = t.elapsed();
        eprintln!(
            "[{} MiB] manual {how}: {:.2} s = stop {:.2} s + restores {:.2} s ({}) + start {:.2} s; CPU {cpu:.2} s; \
             peak RSS {} MiB",
            self.mib,
            wall.as_secs_f64(),
            stopped.as_secs_f64(),
            restore_wall.as_secs_f64(),
            if each.is_empty() { "at once".to_owned() } else { each.join(" + ") },
            start.as_secs_f64(),
            mib(rss)
        );
        Ok(Row {
            mib: self.mib,
            method: format!("manual: stop, ferry-agent restore ×3 {how}, start"),
            wall,
            cpu: Some(cpu),
            rss: Some(rss),
            floor: false,
            note: format!(
                "stop {:.1} + restore {:.1} + start {:.1}",
                stopped.as_secs_f64(),
                restore_wall.as_secs_f64(),
                start.as_secs_f64()
            ),
            failed: false,
        })
    }

    fn teardown(mut self) {
        self.stop_agents();
        let _ = self.stop_gates();
        self.coordinator = None;
        if std::env::var_os("FERRY_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {}", self.dir.display());
        }
    }
}

fn print_table(rows: &[Row], data: &[Data], cores: usize) {
    println!();
    for d in data {
        println!(
            "data: etcd DB {} MiB, {} keys of Kubernetes-like JSON objects, each with as many bytes of random base64 \
             as the rest of it; snapshot {} MiB, stored (zstd) {} MiB: {:.2}× compressible. Machine: {cores} cores.",
            mib(d.db),
            d.keys,
            mib(d.rawsize),
            mib(d.stored),
            d.rawsize as f64 / d.stored.max(1) as f64
        );
    }
    println!(
        "CPU s: the coordinator's and the agents' (with their etcdutl) for ferryctl restore, the ferry-agent \
         restores' (with their etcdutl) for the manual path, etcdutl's for the floor. Peak RSS: the largest agent, \
         ferry-agent restore or etcdutl."
    );
    println!();
    println!(
        "| {:>7} | {:<58} | {:>7} | {:>7} | {:>10} | {:>12} | {:<34} |",
        "DB MiB", "method", "wall s", "× floor", "CPU s", "peak RSS MiB", "split, s"
    );
    println!("|{:-<9}|{:-<60}|{:-<9}|{:-<9}|{:-<12}|{:-<14}|{:-<36}|", "", "", "", "", "", "", "");
    for r in rows {
        let floor = rows.iter().find(|o| o.mib == r.mib && o.floor && !r.failed).map(|f| f.wall.as_secs_f64());
        println!(
            "| {:>7} | {:<58} | {:>7.2} | {:>7} | {:>10} | {:>12} | {:<34} |",
            r.mib,
            r.method,
            r.wall.as_secs_f64(),
            floor.map(|f| format!("{:.2}", r.wall.as_secs_f64() / f)).unwrap_or_default(),
            r.cpu.map(|c| format!("{c:.2}")).unwrap_or_default(),
            r.rss.map(mib).unwrap_or_default(),
            r.note
        );
    }
}
