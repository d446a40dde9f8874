//! Backup benchmark: a Ferry backup to S3 against what a user would script without Ferry, in one run.
//!
//! `cargo build --release --bins && cargo bench -p ferry-tests --bench backup`
//!
//! For each database size (default 1 GiB and 2 GiB of Kubernetes-like objects; `FERRY_BENCH_GIB=0.25,0.5`
//! picks others) it fills a fresh single-member etcd (quota raised) from a deterministic generator, then times:
//! 1. `etcdctl snapshot save` to local disk alone;
//! 2. the sequential pipeline: `etcdctl snapshot save` → `zstd -3` → `aws s3 cp` to the same s3s-fs;
//! 3. a Ferry backup to that s3s-fs (apply → status ok), with the agent's peak RSS and disk writes;
//! 4. the same with the upload capped (S3 slower than etcd), to show memory stays flat under backpressure;
//! 5. the defaults while 200 puts/s are written (paced by etcd's latency), and while nobody writes to etcd.
//!
//! Then it restores the newest backup with `zstd -d` + `etcdutl snapshot restore` (with and without fetching
//! it first) and with `ferry-agent restore`, both bumping the revision as a Kubernetes restore needs.
//! `FERRY_BENCH_ONLY=restore` skips the backup comparisons (one Ferry backup, then the restores).
//! `FERRY_BENCH_ONLY=encryption` compares Ferry backups to S3 with and without age encryption (alternating,
//! `FERRY_BENCH_RUNS` each, default 3): wall time, the agent's CPU seconds and its peak RSS.
//! `FERRY_BENCH_ONLY=latency` measures etcd's put latency idle and during Ferry backups with the defaults
//! (the read paced by etcd's latency), a fixed 40 MiB/s cap and full speed (adaptation off), alternating,
//! `FERRY_BENCH_RUNS` each.
//!
//! Runs on etcd 3.5 from `.tools/etcd-3.5` (`tests/setup.sh` puts it there; `FERRY_ETCD_DIR` picks another).
//! Needs zstd, s3s-fs and the aws CLI (`tests/setup.sh` installs them) and the release binaries in
//! target/release. Prints a table; it is a benchmark, never a pass/fail test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::Client;
use ferry_tests::bench::fill::{fill, DENSE_BLOB};
use ferry_tests::bench::{cpu_seconds, proc_stats, release_bin, use_etcd_under_test, Proc};

const ACCESS_KEY: &str = "benchaccess";
const SECRET_KEY: &str = "benchsecretkey";
const BUCKET: &str = "bench";
const CLUSTER: &str = "bench";
/// The upload cap of the throttled run, Mbit/s: slower than etcd streams its snapshot.
const THROTTLED_MBPS: u64 = 800;
/// The row of a backup with the defaults while nobody writes to etcd.
const IDLE_DEFAULTS: &str = "ferry → S3, defaults, nobody writing to etcd";
/// Small puts per second while etcd's write latency is measured.
const LATENCY_PUTS_PER_S: u64 = 200;

fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
    let f = std::fs::File::create(log)?;
    let child = cmd
        .stdout(Stdio::from(f.try_clone()?))
        .stderr(Stdio::from(f))
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    Ok(Proc(child))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    run(cmd)?;
    Ok(t.elapsed())
}

fn db_size(endpoint: &str) -> Result<u64> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "endpoint", "status", "-w", "json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse etcdctl endpoint status")?;
    v[0]["Status"]["dbSize"].as_u64().context("dbSize in etcdctl output")
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Runs a command; returns its wall time and CPU seconds.
fn timed_cpu(cmd: &mut Command) -> Result<(Duration, f64)> {
    let before = cpu_seconds("self", true);
    let wall = timed(cmd)?;
    Ok((wall, cpu_seconds("self", true) - before))
}

/// etcd's write latency: small puts at a steady rate until `stop`, each put's latency recorded.
async fn put_latencies(endpoint: String, stop: flag::Stop) -> Result<Vec<Duration>> {
    Ok(put_latencies_at(endpoint, stop).await?.into_iter().map(|(_, l)| l).collect())
}

/// [`put_latencies`] with the time each put started.
async fn put_latencies_at(endpoint: String, stop: flag::Stop) -> Result<Vec<(Instant, Duration)>> {
    let mut client = Client::connect([endpoint], None).await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_PUTS_PER_S));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut i = 0u64;
    while !stop.is_set() {
        tick.tick().await;
        let t = Instant::now();
        client.put(format!("/bench/latency/{}", i % 1000), format!("value-{i}"), None).await?;
        out.push((t, t.elapsed()));
        i += 1;
    }
    Ok(out)
}

/// A stop flag shared with a measuring task.
mod flag {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    pub(crate) struct Stop(Arc<AtomicBool>);

    impl Stop {
        pub(crate) fn set(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
        pub(crate) fn is_set(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}

/// p50, p99 and max of latencies, in ms.
fn percentiles(mut l: Vec<Duration>) -> (f64, f64, f64) {
    if l.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    l.sort();
    let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99), at(1.0))
}

struct Ferry {
    dir: PathBuf,
    config: PathBuf,
    addr: String,
    s3_endpoint: String,
    etcd: String,
    coordinator: Option<Proc>,
    /// The coordinator's `--metrics-listen` port (`ferry_store_verify_read_bytes_total`).
    metrics_port: u16,
}

impl Ferry {
    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write;
        let elsewhere = ELSEWHERE.lock().ok().and_then(|g| g.clone());
        let mut cmd = match elsewhere {
            // Polled 20 times a second: in the latency bench it runs off the node, like its coordinator.
            Some(group) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", group.display()))
                    .arg(release_bin("ferryctl")?);
                c
            }
            None => Command::new(release_bin("ferryctl")?),
        };
        cmd.arg("--ferryconfig").arg(&self.config).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn()?;
        if let (Some(text), Some(mut i)) = (stdin, child.stdin.take()) {
            i.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("ferryctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_coordinator(&mut self, extra: &[String]) -> Result<()> {
        self.coordinator = None;
        let mut cmd = Command::new(release_bin("ferry-coordinator")?);
        cmd.arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--listen", &self.addr, "--backup-store", "s3"])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(extra);
        self.coordinator = Some(spawn(&mut cmd, &self.dir.join("coordinator.log"))?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ctl(&["get", "agents"], None).is_err() {
            if Instant::now() > deadline {
                bail!("coordinator did not come up; see {}", self.dir.join("coordinator.log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let cfg = format!(
            "metadata:\n  namespace: default\n  type: EtcdBackupS3Configs.ferry.dev\n  id: etcd-backup-s3-conf\nspec:\n  bucket: {BUCKET}\n  endpoint: {}\n  accesskeyid: {ACCESS_KEY}\n  secretaccesskey: {SECRET_KEY}\n  prefix: ferry\n",
            self.s3_endpoint
        );
        self.ctl(&["apply", "-f", "-"], Some(&cfg))?;
        Ok(())
    }

    fn start_agent(&self, extra: &[String]) -> Result<Proc> {
        let creds = self.dir.join("agent-creds");
        if !creds.exists() {
            self.ctl(
                &["agent-credentials", "--cluster", CLUSTER, "--member", "m1", "--out", &creds.to_string_lossy()],
                None,
            )?;
        }
        let mut cmd = Command::new(release_bin("ferry-agent")?);
        // As deploy/Containerfile and the systemd unit run it (FERRY_BENCH_GLIBC_DEFAULTS: without).
        if std::env::var_os("FERRY_BENCH_GLIBC_DEFAULTS").is_none() {
            cmd.env("MALLOC_MMAP_THRESHOLD_", "1048576");
        }
        cmd.args(["--coordinator", &self.addr, "--credentials"])
            .arg(&creds)
            .args(["--etcd-endpoints", &self.etcd])
            .args(extra);
        let agent = spawn(&mut cmd, &self.dir.join("agent.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.ctl(&["get", "agents", "-o", "json"], None)?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            if v.as_array().is_some_and(|a| {
                a.iter().any(|a| a["spec"]["connected"] == true && a["spec"]["dbsize"].as_i64() > Some(0))
            }) {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("agent did not connect; see {}", self.dir.join("agent.log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Bytes the coordinator read back from S3 to verify uploads since it started
    /// (`ferry_store_verify_read_bytes_total`; issue 29: ≤ 1 % of each object with the default).
    fn verify_read_bytes(&self) -> Result<u64> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut body = String::new();
        conn.read_to_string(&mut body)?;
        body.lines()
            .find_map(|l| l.strip_prefix("ferry_store_verify_read_bytes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .context("no ferry_store_verify_read_bytes_total on the coordinator's /metrics")
    }

    /// One backup: (wall time from apply to status ok, stored bytes).
    fn backup(&self, seq: i64) -> Result<(Duration, u64)> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64 + seq;
        let yaml = format!(
            "metadata:\n  namespace: ephemeral\n  type: EtcdManualBackups.ferry.dev\n  id: {CLUSTER}\nspec:\n  backupat:\n    seconds: {now}\n    nanos: 0\n"
        );
        let t = Instant::now();
        self.ctl(&["apply", "-f", "-"], Some(&yaml))?;
        loop {
            let v: serde_json::Value =
                serde_json::from_str(&self.ctl(&["get", "etcdbackupstatus", CLUSTER, "-o", "json"], None)?)?;
            match v["spec"]["status"].as_i64() {
                Some(1) => {
                    let elapsed = t.elapsed();
                    let list: serde_json::Value =
                        serde_json::from_str(&self.ctl(&["get", "etcdbackup", "-o", "json"], None)?)?;
                    return Ok((elapsed, list[0]["spec"]["size"].as_u64().unwrap_or(0)));
                }
                Some(2) => bail!("ferry backup failed: {}", v["spec"]["error"]),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

struct Row {
    gib: f64,
    data: &'static str,
    method: String,
    wall: Duration,
    /// CPU seconds of the process doing the work (the agent, or the tools' children).
    cpu: Option<f64>,
    rss: Option<u64>,
    disk_writes: Option<u64>,
    stored: u64,
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// Agent flags for etcd's stream read at full speed: no ceiling, and no slowing down for etcd's latency.
fn uncapped() -> Vec<String> {
    ["--etcd-read-limit-mibps", "0", "--etcd-latency-backoff", "0"].map(String::from).to_vec()
}

fn only_restore() -> bool {
    std::env::var("FERRY_BENCH_ONLY").is_ok_and(|v| v == "restore")
}

fn only_latency() -> bool {
    std::env::var("FERRY_BENCH_ONLY").is_ok_and(|v| v == "latency")
}

/// A cgroup v1 `cpu` group, as a container's resources put it: `millicores` requested (cpu.shares, what
/// decides contended slices) and optionally a limit of `cores` (CFS quota). Its processes go back to the root
/// group and the group is removed on drop.
struct CpuLimit(PathBuf);

const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

/// The latency bench's group for what production runs off the node (coordinator, S3, ferryctl).
static ELSEWHERE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

impl CpuLimit {
    fn new(name: &str, millicores: u64, cores: Option<f64>) -> Result<Self> {
        let dir = PathBuf::from(format!("{CPU_ROOT}/ferry-bench-{}-{name}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let limit = Self(dir);
        // What the kubelet writes for a request: 1024 shares per core.
        std::fs::write(limit.0.join("cpu.shares"), (millicores * 1024 / 1000).max(2).to_string())?;
        if let Some(cores) = cores {
            std::fs::write(limit.0.join("cpu.cfs_period_us"), "100000")?;
            std::fs::write(limit.0.join("cpu.cfs_quota_us"), ((cores * 100_000.0) as u64).to_string())?;
        }
        Ok(limit)
    }

    fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).context("move a process into a cpu group")
    }

    /// Back into the root group, where processes started without resources run.
    fn to_root(pid: u32) -> Result<()> {
        std::fs::write(Path::new(CPU_ROOT).join("cgroup.procs"), pid.to_string()).context("move to the root group")
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|p| p.trim().parse().ok()) {
            let _ = Self::to_root(pid);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// etcd's put latency idle and during backups with each way of sparing etcd, alternating configurations.
///
/// In production the coordinator and S3 run elsewhere; here they share the node's cores and disk. So they
/// get only what etcd and the agent leave (a group with the fewest shares), and S3 keeps its objects in
/// memory (tmpfs), not on etcd's disk, where its writes would queue before etcd's fsyncs.
async fn bench_latency(
    ferry: &mut Ferry,
    run_: &Run<'_>,
    db_gib: f64,
    (etcd_pid, s3_pid): (u32, u32),
    latency_rows: &mut Vec<LatencyRow>,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let runs: usize = std::env::var("FERRY_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    ferry.start_coordinator(&[])?;
    let elsewhere = CpuLimit::new("elsewhere", 0, None)
        .and_then(|g| {
            g.add(s3_pid)?;
            g.add(ferry.coordinator.as_ref().context("coordinator")?.0.id())?;
            Ok(g)
        })
        .map_err(|e| eprintln!("no cgroup for the coordinator and S3 ({e:#}); they compete with etcd"))
        .ok();
    if let (Some(g), Ok(mut to)) = (&elsewhere, ELSEWHERE.lock()) {
        *to = Some(g.0.clone());
    }
    // etcd as kubeadm's static pod asks (100m), for pod rows (none at present: a config's third field, e.g.
    // `Some((25, Some(1.0)))` for the shipped request and limit); in the others it runs as a plain process
    // beside the agent. Without a writable cgroup hierarchy the pod rows are skipped.
    let etcd_group = CpuLimit::new("etcd", 100, None)
        .map_err(|e| eprintln!("no cgroup for etcd ({e:#}); the pod rows are skipped"))
        .ok();
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    // (label, agent flags, the agent container's request in millicores and limit in cores)
    type Pod = Option<(u64, Option<f64>)>;
    let mut configs: Vec<(&str, Vec<String>, Pod)> = vec![
        ("ferry, defaults (read paced by etcd's latency, no ceiling)", vec![], None),
        (
            "ferry, read ≤ 40 MiB/s fixed (adaptation off)",
            args(&["--etcd-read-limit-mibps", "40", "--etcd-latency-backoff", "0"]),
            None,
        ),
        ("ferry, read uncapped (adaptation off)", uncapped(), None),
    ];
    // FERRY_BENCH_LATENCY_QUICK: only the defaults against full speed.
    if std::env::var_os("FERRY_BENCH_LATENCY_QUICK").is_some() {
        configs.retain(|(label, _, pod)| pod.is_none() && !label.contains("fixed"));
    }
    let mut idle = Vec::new();
    let mut etcdctl = (Vec::new(), Vec::new());
    let snap = PathBuf::from(format!("/dev/shm/ferry-bench-{}-snap.db", std::process::id()));
    let mut during: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    let mut stats: Vec<Vec<(Duration, f64, u64, u64)>> = vec![Vec::new(); configs.len()];
    let mut seq = 0;
    for _ in 0..runs {
        let stop = flag::Stop::default();
        let probe = tokio::spawn(put_latencies(ferry.etcd.clone(), stop.clone()));
        // As many idle puts as a default backup's: a p99 from a few hundred samples is a guess.
        tokio::time::sleep(Duration::from_secs(30)).await;
        stop.set();
        idle.extend(probe.await??);
        // etcd's own cost of a snapshot: etcdctl streaming it into memory (tmpfs), no disk, no compression.
        CpuLimit::to_root(etcd_pid)?;
        let (saved, lat) = while_putting(&ferry.etcd, "etcdctl snapshot save → tmpfs", || {
            timed(
                Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", &ferry.etcd, "snapshot", "save"])
                    .arg(&snap),
            )
        })
        .await?;
        let _ = std::fs::remove_file(&snap);
        etcdctl.1.push(saved?);
        etcdctl.0.extend(lat);
        for (i, (label, agent_args, pod)) in configs.iter().enumerate() {
            let agent_group = match (pod, &etcd_group) {
                (None, _) => {
                    CpuLimit::to_root(etcd_pid)?;
                    None
                }
                (Some(_), None) => continue,
                (Some((request, limit)), Some(etcd_group)) => {
                    etcd_group.add(etcd_pid)?;
                    Some(CpuLimit::new(&format!("agent-{i}"), *request, *limit)?)
                }
            };
            eprintln!("[{:.2} GiB {}] {label}…", db_gib, run_.data());
            let agent = ferry.start_agent(agent_args)?;
            if let Some(g) = &agent_group {
                g.add(agent.0.id())?;
            }
            let pid = agent.0.id().to_string();
            let cpu_before = cpu_seconds(&pid, false);
            seq += 1;
            let (backup, lat) = {
                let ferry = &*ferry;
                while_putting(&ferry.etcd, label, || ferry.backup(seq)).await?
            };
            during[i].extend(lat);
            let (wall, stored) = backup?;
            let cpu = cpu_seconds(&pid, false) - cpu_before;
            let (rss, _) = proc_stats(agent.0.id());
            stats[i].push((wall, cpu, rss, stored));
            drop(agent);
            drop(agent_group);
        }
    }
    CpuLimit::to_root(etcd_pid)?;
    if let Ok(mut to) = ELSEWHERE.lock() {
        *to = None;
    }
    drop(elsewhere);
    latency_rows.push(LatencyRow {
        gib: db_gib,
        data: run_.data(),
        during: "idle".into(),
        latencies: percentiles(idle),
    });
    let mut saves = etcdctl.1;
    saves.sort();
    if let Some(wall) = saves.get(saves.len() / 2) {
        rows.push(Row {
            gib: db_gib,
            data: run_.data(),
            method: format!("etcdctl snapshot save → tmpfs (median of {})", saves.len()),
            wall: *wall,
            cpu: None,
            rss: None,
            disk_writes: None,
            stored: 0,
        });
        latency_rows.push(LatencyRow {
            gib: db_gib,
            data: run_.data(),
            during: "etcdctl snapshot save → tmpfs".into(),
            latencies: percentiles(etcdctl.0),
        });
    }
    for (i, (label, _, _)) in configs.iter().enumerate() {
        let mut s = std::mem::take(&mut stats[i]);
        if s.is_empty() {
            continue;
        }
        s.sort_by_key(|x| x.0);
        let (wall, cpu, rss, stored) = s[s.len() / 2];
        rows.push(Row {
            gib: db_gib,
            data: run_.data(),
            method: format!("{label} (median of {})", s.len()),
            wall,
            cpu: Some(cpu),
            rss: Some(rss),
            disk_writes: None,
            stored,
        });
        let lat = percentiles(std::mem::take(&mut during[i]));
        latency_rows.push(LatencyRow { gib: db_gib, data: run_.data(), during: (*label).into(), latencies: lat });
    }
    Ok(())
}

/// Runs `work` (blocking) while small puts stream into etcd at `endpoint`; its result and each put's
/// latency, with the slowest reported under `label`.
async fn while_putting<T>(endpoint: &str, label: &str, work: impl FnOnce() -> T) -> Result<(T, Vec<Duration>)> {
    let stop = flag::Stop::default();
    let probe = tokio::spawn(put_latencies_at(endpoint.to_owned(), stop.clone()));
    let start = Instant::now();
    let result = tokio::task::block_in_place(work);
    stop.set();
    let lat = probe.await??;
    report_stalls(label, start, &lat);
    Ok((result, lat.into_iter().map(|(_, l)| l).collect()))
}

/// The slowest puts of one measured backup and when they came (seconds after its start), on stderr: a stall
/// at the start is etcd opening the snapshot, one spread over it the stream competing with etcd.
fn report_stalls(label: &str, start: Instant, lat: &[(Instant, Duration)]) {
    let mut worst: Vec<&(Instant, Duration)> = lat.iter().collect();
    worst.sort_by_key(|(_, l)| std::cmp::Reverse(*l));
    let over = lat.iter().filter(|(_, l)| *l > Duration::from_millis(5)).count();
    let at: Vec<String> = worst
        .iter()
        .take(5)
        .map(|(t, l)| {
            let off = t.saturating_duration_since(start).as_secs_f64();
            format!("{:.0} ms at {off:.2}s", l.as_secs_f64() * 1e3)
        })
        .collect();
    eprintln!("  {label}: {} puts, {over} over 5 ms; slowest: {}", lat.len(), at.join(", "));
}

fn only_encryption() -> bool {
    std::env::var("FERRY_BENCH_ONLY").is_ok_and(|v| v == "encryption")
}

/// Plain against encrypted Ferry backups of the same database, alternating so drift hits both alike.
fn bench_encryption(ferry: &mut Ferry, db: u64) -> Result<()> {
    let runs: usize = std::env::var("FERRY_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    ferry.start_coordinator(&[])?;
    let agent = ferry.start_agent(&uncapped())?;
    let pid = agent.0.id().to_string();
    let key = ferry.dir.join("bench-key.txt");
    let recipient = ferry.ctl(&["encryption", "keygen", "--out", &key.to_string_lossy()], None)?.trim().to_owned();
    let config = |recipients: &str| {
        format!(
            "metadata:\n  namespace: default\n  type: EtcdBackupEncryptionConfigs.ferry.dev\n  id: etcd-backup-encryption\nspec:\n  recipients: [{recipients}]\n"
        )
    };
    // (wall s, agent CPU s, agent peak RSS after the run) per mode.
    let mut plain = Vec::new();
    let mut sealed = Vec::new();
    let mut seq = 0;
    for i in 0..runs * 2 {
        let encrypted = i % 2 == 1;
        ferry.ctl(&["apply", "-f", "-"], Some(&config(if encrypted { &recipient } else { "" })))?;
        let cpu_before = cpu_seconds(&pid, false);
        let (wall, stored) = ferry.backup(seq)?;
        seq += 2;
        let cpu = cpu_seconds(&pid, false) - cpu_before;
        let (rss, _) = proc_stats(agent.0.id());
        eprintln!(
            "  {} run {}: {:.2}s wall, {cpu:.2} CPU s, stored {} MiB",
            if encrypted { "encrypted" } else { "plain" },
            i / 2 + 1,
            wall.as_secs_f64(),
            mib(stored)
        );
        if encrypted { &mut sealed } else { &mut plain }.push((wall.as_secs_f64(), cpu, rss));
    }
    let median = |v: &[(f64, f64, u64)], f: fn(&(f64, f64, u64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let spread = |v: &[(f64, f64, u64)], f: fn(&(f64, f64, u64)) -> f64| {
        let x: Vec<f64> = v.iter().map(f).collect();
        x.iter().cloned().fold(f64::MIN, f64::max) - x.iter().cloned().fold(f64::MAX, f64::min)
    };
    println!();
    println!("encryption cost, etcd DB {} MiB, {runs} runs each (median; spread = max - min):", mib(db));
    println!("| mode      | wall s | wall spread | agent CPU s | CPU spread | agent peak RSS |");
    println!("|-----------|--------|-------------|-------------|------------|----------------|");
    for (name, v) in [("plain", &plain), ("encrypted", &sealed)] {
        println!(
            "| {name:<9} | {:>6.2} | {:>11.2} | {:>11.2} | {:>10.2} | {:>10} MiB |",
            median(v, |r| r.0),
            spread(v, |r| r.0),
            median(v, |r| r.1),
            spread(v, |r| r.1),
            mib(v.iter().map(|r| r.2).max().unwrap_or(0))
        );
    }
    println!(
        "encrypted / plain: wall {:.3}, agent CPU {:.3}",
        median(&sealed, |r| r.0) / median(&plain, |r| r.0),
        median(&sealed, |r| r.1) / median(&plain, |r| r.1)
    );
    Ok(())
}

fn main() -> Result<()> {
    let etcd = use_etcd_under_test()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cores} cores; {etcd}");
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench())
}

async fn bench() -> Result<()> {
    let sizes: Vec<f64> = std::env::var("FERRY_BENCH_GIB")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1.0, 2.0]);
    let kinds: Vec<bool> = std::env::var("FERRY_BENCH_DATA")
        .unwrap_or_else(|_| "k8s,dense".into())
        .split(',')
        .map(|k| k.trim() == "dense")
        .collect();
    let levels: Vec<i32> = std::env::var("FERRY_BENCH_LEVELS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![3]);
    let mut rows = Vec::new();
    let mut restore_rows = Vec::new();
    let mut latency_rows = Vec::new();
    let mut n = 0;
    for gib in &sizes {
        for dense in &kinds {
            let run = Run { gib: *gib, dense: *dense, n, levels: &levels };
            rows.extend(bench_size(&run, &mut restore_rows, &mut latency_rows).await?);
            n += 1;
        }
    }
    if !rows.is_empty() {
        print_table(&rows);
        print_latency_table(&latency_rows);
    }
    if !only_encryption() {
        print_restore_table(&restore_rows);
    }
    Ok(())
}

/// One database to measure: its size, its kind of data, and the zstd levels to try.
struct Run<'a> {
    gib: f64,
    dense: bool,
    n: usize,
    levels: &'a [i32],
}

impl Run<'_> {
    fn data(&self) -> &'static str {
        if self.dense {
            "dense"
        } else {
            "k8s"
        }
    }
}

async fn bench_size(
    run_: &Run<'_>,
    restore_rows: &mut Vec<RestoreRow>,
    latency_rows: &mut Vec<LatencyRow>,
) -> Result<Vec<Row>> {
    let (gib, data) = (run_.gib, run_.data());
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}-{}", std::process::id(), run_.n));
    let _ = std::fs::remove_dir_all(&dir);
    // The latency bench keeps S3's objects off etcd's disk, as a real S3 is (see `bench_latency`).
    let s3_root = if only_latency() {
        PathBuf::from(format!("/dev/shm/ferry-bench-{}-{}-s3", std::process::id(), run_.n))
    } else {
        dir.join("s3")
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(s3_root.join(BUCKET))?;
    let (cport, pport, s3port, qport) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{cport}");
    let peer = format!("http://127.0.0.1:{pport}");
    let _etcd = spawn(
        Command::new("etcd").args([
            "--name",
            "bench",
            "--data-dir",
            &dir.join("etcd").to_string_lossy(),
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("bench={peer}"),
            "--quota-backend-bytes",
            "17179869184",
        ]),
        &dir.join("etcd.log"),
    )?;
    let s3_endpoint = format!("http://127.0.0.1:{s3port}");
    let _s3 = spawn(
        Command::new("s3s-fs")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &s3port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(&s3_root),
        &dir.join("s3s.log"),
    )?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let target = (gib * 1024.0 * 1024.0 * 1024.0) as u64;
    eprintln!("[{gib} GiB {data}] filling etcd…");
    let t = Instant::now();
    let blob = if run_.dense { DENSE_BLOB } else { 0 };
    let filled = fill(&etcd_url, target, blob, 0).await?;
    let (written, keys) = (filled.written, filled.keys);
    let db = db_size(&etcd_url)?;
    let db_gib = db as f64 / (1024.0 * 1024.0 * 1024.0);
    eprintln!(
        "[{gib} GiB {data}] wrote {} MiB in {keys} objects in {:.1}s; etcd DB is {} MiB",
        mib(written),
        t.elapsed().as_secs_f64(),
        mib(db)
    );

    let mut rows = Vec::new();
    let mut row = |method: String, wall: Duration, cpu: Option<f64>, rss: Option<u64>, disk: Option<u64>, stored| {
        rows.push(Row { gib: db_gib, data, method, wall, cpu, rss, disk_writes: disk, stored });
    };
    let snap = dir.join("snap.db");
    let mut ferry = Ferry {
        config: dir.join("state/admin.ferryconfig"),
        addr: format!("127.0.0.1:{qport}"),
        dir: dir.clone(),
        s3_endpoint: s3_endpoint.clone(),
        etcd: etcd_url.clone(),
        coordinator: None,
        metrics_port: free_port()?,
    };
    if only_encryption() {
        bench_encryption(&mut ferry, db)?;
        drop(ferry);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(Vec::new());
    }
    if only_latency() {
        bench_latency(&mut ferry, run_, db_gib, (_etcd.0.id(), _s3.0.id()), latency_rows, &mut rows).await?;
        let _ = std::fs::remove_dir_all(&s3_root);
        drop(ferry);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(rows);
    }
    if only_restore() {
        ferry.start_coordinator(&[])?;
        let _agent = ferry.start_agent(&uncapped())?;
        ferry.backup(0)?;
        restore_rows.extend(bench_restore(&ferry, db_gib)?);
        drop(ferry);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(Vec::new());
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let etcd_pid = _etcd.0.id().to_string();
    let s3_pid = _s3.0.id().to_string();
    eprintln!("[{gib} GiB {data}] etcdctl snapshot save…");
    let etcd_before = cpu_seconds(&etcd_pid, false);
    let (wall, cpu) = timed_cpu(
        Command::new("etcdctl").env("ETCDCTL_API", "3").args(["--endpoints", &etcd_url, "snapshot", "save"]).arg(&snap),
    )?;
    let etcd_cpu = cpu_seconds(&etcd_pid, false) - etcd_before;
    println!(
        "CPU budget [{db_gib:.2} GiB {data}] etcdctl snapshot save: etcd {etcd_cpu:.2} s + etcdctl {cpu:.2} s = {:.2} s \
         in {:.2} s wall ({cores} cores: {:.2} s available)",
        etcd_cpu + cpu,
        wall.as_secs_f64(),
        wall.as_secs_f64() * cores as f64
    );
    row("etcdctl snapshot save (local disk)".into(), wall, Some(cpu), None, Some(file_size(&snap)), file_size(&snap));
    for level in run_.levels {
        let zst = dir.join("alone.zst");
        let (wall, cpu) =
            timed_cpu(Command::new("zstd").arg(format!("-{level}")).args(["-q", "-f"]).arg(&snap).arg("-o").arg(&zst))?;
        row(format!("zstd -{level} alone on the saved snapshot"), wall, Some(cpu), None, None, file_size(&zst));
        std::fs::remove_file(&zst)?;
    }
    // zstd's own adaptive mode: it moves its level with how fast its output drains, here to S3 (what an
    // adaptive Ferry would do); the CPU column includes the aws CLI's.
    eprintln!("[{gib} GiB {data}] zstd --adapt → aws s3 cp -…");
    let adapt_key = "adapt/snap.db.zst";
    let (wall, cpu) = timed_cpu(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd --adapt -q -c \"$0\" | aws --endpoint-url {s3_endpoint} s3 cp --only-show-errors - s3://{BUCKET}/{adapt_key}"
            ))
            .arg(&snap)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    )?;
    let stored = file_size(&s3_root.join(BUCKET).join(adapt_key));
    row("saved snapshot → zstd --adapt → aws s3 cp -".into(), wall, Some(cpu), None, None, stored);
    std::fs::remove_file(&snap)?;

    eprintln!("[{gib} GiB {data}] etcdctl save → zstd -3 → aws s3 cp…");
    let zst = dir.join("snap.db.zst");
    let t = Instant::now();
    let cpu_before = cpu_seconds("self", true);
    run(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd_url, "snapshot", "save"])
        .arg(&snap))?;
    run(Command::new("zstd").args(["-3", "-q", "-f"]).arg(&snap).arg("-o").arg(&zst))?;
    run(Command::new("aws")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .args(["--endpoint-url", &s3_endpoint, "s3", "cp", "--only-show-errors"])
        .arg(&zst)
        .arg(format!("s3://{BUCKET}/pipeline/snap.db.zst")))?;
    let wall = t.elapsed();
    row(
        "etcdctl save → zstd -3 → aws s3 cp".into(),
        wall,
        Some(cpu_seconds("self", true) - cpu_before),
        None,
        Some(file_size(&snap) + file_size(&zst)),
        file_size(&zst),
    );
    std::fs::remove_file(&snap)?;
    std::fs::remove_file(&zst)?;

    // etcd's write latency with nothing else running, then during each Ferry backup.
    eprintln!("[{gib} GiB {data}] etcd put latency, idle…");
    let stop = flag::Stop::default();
    let idle = tokio::spawn(put_latencies(etcd_url.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.set();
    latency_rows.push(LatencyRow { gib: db_gib, data, during: "idle".into(), latencies: percentiles(idle.await??) });

    let args = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    // The pipeline's own speed: etcd's stream read as fast as it goes (the default slows down while etcd's
    // latency rises, as it does under this bench's puts; its row comes last).
    let mut runs: Vec<(String, Vec<String>, Vec<String>)> = run_
        .levels
        .iter()
        .map(|l| (format!("ferry → S3, zstd -{l}, read uncapped"), args(&["--zstd-level", &l.to_string()]), uncapped()))
        .collect();
    runs.push((
        "ferry → S3, zstd -3, 2 zstd workers, uncapped".into(),
        args(&["--zstd-level", "3"]),
        [uncapped(), args(&["--zstd-workers", "2"])].concat(),
    ));
    runs.push((
        format!("ferry → S3, upload capped at {THROTTLED_MBPS} Mbit/s"),
        args(&["--upload-limit-mbps", &THROTTLED_MBPS.to_string()]),
        uncapped(),
    ));
    runs.push(("ferry → S3, defaults (read paced by etcd's latency, zstd -1)".into(), vec![], vec![]));
    // The same defaults with nobody writing to etcd: the case `etcdctl snapshot save` is compared with.
    runs.push((IDLE_DEFAULTS.into(), vec![], vec![]));
    for (seq, (label, extra, agent_extra)) in runs.into_iter().enumerate() {
        let puts = label != IDLE_DEFAULTS;
        eprintln!("[{gib} GiB {data}] {label}…");
        ferry.start_coordinator(&extra)?;
        let agent = ferry.start_agent(&agent_extra)?;
        let pid = agent.0.id().to_string();
        let (_, writes_before) = proc_stats(agent.0.id());
        let cpu_before = cpu_seconds(&pid, false);
        let coordinator_pid = ferry.coordinator.as_ref().map(|c| c.0.id().to_string()).unwrap_or_default();
        let others = |pids: [&str; 3]| pids.map(|p| cpu_seconds(p, false));
        let others_before = others([&etcd_pid, &coordinator_pid, &s3_pid]);
        let stop = flag::Stop::default();
        let during = puts.then(|| tokio::spawn(put_latencies(etcd_url.clone(), stop.clone())));
        let backup = {
            let ferry = &ferry;
            tokio::task::block_in_place(|| ferry.backup(seq as i64))
        };
        stop.set();
        let latencies = match during {
            Some(d) => Some(d.await??),
            None => None,
        };
        let (wall, stored) = backup?;
        // One backup per coordinator start: the counter is this backup's.
        let read = ferry.verify_read_bytes()?;
        println!(
            "Verification [{db_gib:.2} GiB {data}] {label}: the coordinator read back {read} of {stored} bytes ({:.4} %)",
            read as f64 * 100.0 / stored.max(1) as f64
        );
        let cpu = cpu_seconds(&pid, false) - cpu_before;
        let after = others([&etcd_pid, &coordinator_pid, &s3_pid]);
        let [e, c, s3] = [0, 1, 2].map(|i| after[i] - others_before[i]);
        println!(
            "CPU budget [{db_gib:.2} GiB {data}] {label}: etcd {e:.2} s + agent {cpu:.2} s + coordinator {c:.2} s \
             + s3s-fs {s3:.2} s = {:.2} s in {:.2} s wall ({cores} cores: {:.2} s available)",
            e + cpu + c + s3,
            wall.as_secs_f64(),
            wall.as_secs_f64() * cores as f64
        );
        let (rss, writes_after) = proc_stats(agent.0.id());
        if let Some(latencies) = latencies {
            latency_rows.push(LatencyRow {
                gib: db_gib,
                data,
                during: label.clone(),
                latencies: percentiles(latencies),
            });
        }
        row(label, wall, Some(cpu), Some(rss), Some(writes_after - writes_before), stored);
    }
    restore_rows.extend(bench_restore(&ferry, db_gib)?);
    drop(ferry);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("[{gib} GiB {data}] etcd DB {} MiB", mib(db));
    Ok(rows)
}

struct LatencyRow {
    gib: f64,
    data: &'static str,
    during: String,
    /// p50, p99, max in ms.
    latencies: (f64, f64, f64),
}

fn print_latency_table(rows: &[LatencyRow]) {
    println!();
    println!("etcd write latency, {LATENCY_PUTS_PER_S} small puts/s:");
    println!(
        "| {:>6} | {:<5} | {:<44} | {:>7} | {:>7} | {:>7} | {:>10} |",
        "DB GiB", "data", "during", "p50 ms", "p99 ms", "max ms", "p99 × idle"
    );
    println!("|{:-<8}|{:-<7}|{:-<46}|{:-<9}|{:-<9}|{:-<9}|{:-<12}|", "", "", "", "", "", "", "");
    for r in rows {
        let idle = rows
            .iter()
            .find(|o| (o.gib - r.gib).abs() < 1e-9 && o.data == r.data && o.during == "idle")
            .map(|o| o.latencies.1);
        println!(
            "| {:>6.2} | {:<5} | {:<44} | {:>7.2} | {:>7.2} | {:>7.2} | {:>10} |",
            r.gib,
            r.data,
            r.during,
            r.latencies.0,
            r.latencies.1,
            r.latencies.2,
            idle.map(|i| format!("{:.2}", r.latencies.1 / i)).unwrap_or_default()
        );
    }
}

struct RestoreRow {
    gib: f64,
    method: &'static str,
    wall: Duration,
}

/// Restores the newest backup four ways: the standard tools with and without fetching it from S3 first,
/// and `ferry-agent restore` (which fetches, checks and restores in one go) with its scratch copy in memory
/// and on disk.
fn bench_restore(ferry: &Ferry, gib: f64) -> Result<Vec<RestoreRow>> {
    let list: serde_json::Value = serde_json::from_str(&ferry.ctl(&["get", "etcdbackup", "-o", "json"], None)?)?;
    let key = list[0]["spec"]["snapshot"].as_str().context("snapshot key")?.to_string();
    let id = list[0]["metadata"]["id"].as_str().context("backup id")?.to_string();
    let dir = ferry.dir.join("restore");
    std::fs::create_dir_all(&dir)?;
    let member = [
        "--name",
        "r1",
        "--initial-cluster",
        "r1=http://127.0.0.1:2380",
        "--initial-cluster-token",
        "bench",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
    ];
    let zst = dir.join("backup.snapshot.zst");
    let db = dir.join("snapshot.db");
    let creds = ferry.dir.join("agent-creds");
    // The methods take turns, the order rotating each round, so that drift on a shared machine hits all alike.
    let runs: usize = std::env::var("FERRY_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let (mut fetches, mut locals, mut cleanups) = (Vec::new(), Vec::new(), Vec::new());
    // `ferry-agent restore` as it chooses (in memory here) and with its scratch copy on disk.
    let (mut ferries, mut on_disk) = (Vec::new(), Vec::new());
    for i in 0..runs * 3 {
        // Each method starts with the previous one's writes on disk, not still being flushed under it.
        run(&mut Command::new("sync"))?;
        let method = (i + i / 3) % 3;
        if method == 0 {
            eprintln!("[{gib:.2} GiB] restore with aws s3 cp → zstd -d → etcdutl snapshot restore…");
            let fetch = timed(
                Command::new("aws")
                    .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
                    .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
                    .env("AWS_DEFAULT_REGION", "us-east-1")
                    .env("AWS_CONFIG_FILE", "/dev/null")
                    .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
                    .args(["--endpoint-url", &ferry.s3_endpoint, "s3", "cp", "--only-show-errors"])
                    .arg(format!("s3://{BUCKET}/{key}"))
                    .arg(&zst),
            )?;
            let unzstd = timed(Command::new("zstd").args(["-d", "-q", "-f"]).arg(&zst).arg("-o").arg(&db))?;
            let restore = timed(
                Command::new("etcdutl")
                    .args(["snapshot", "restore"])
                    .arg(&db)
                    .arg("--data-dir")
                    .arg(dir.join("tools"))
                    .args(member)
                    // What a Kubernetes restore needs, as Ferry does by default.
                    .args(["--bump-revision", "100000", "--mark-compacted"]),
            )?;
            // A careful script removes its temporary snapshot as `ferry-agent restore` does; unlinking a
            // freshly written multi-GB file waits for its writeback, so it is timed on its own.
            let t = Instant::now();
            std::fs::remove_file(&db)?;
            let cleanup = t.elapsed();
            eprintln!(
                "[{gib:.2} GiB] tools: aws s3 cp {:.2} s, zstd -d {:.2} s, etcdutl restore {:.2} s, rm snapshot {:.2} s",
                fetch.as_secs_f64(),
                unzstd.as_secs_f64(),
                restore.as_secs_f64(),
                cleanup.as_secs_f64()
            );
            let local = unzstd + restore;
            // Free the disk before the next restore: a 3 GiB database is three 4.6 GiB copies at once otherwise.
            for p in [dir.join("tools"), zst.clone()] {
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
            fetches.push(fetch + local);
            locals.push(local);
            cleanups.push(local + cleanup);
        } else {
            let scratch = if method == 1 { "auto" } else { "disk" };
            eprintln!(
                "[{gib:.2} GiB] ferry-agent restore --scratch {scratch}… (started {:.3} s after the epoch)",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64()
            );
            // Its log (phases with timestamps) goes to the bench's stderr: where the time went.
            let wall = timed(
                Command::new(release_bin("ferry-agent")?)
                    .stderr(Stdio::inherit())
                    .args(["restore", "--coordinator", &ferry.addr, "--credentials"])
                    .arg(&creds)
                    .args(["--backup", &id, "--scratch", scratch, "--data-dir"])
                    .arg(dir.join("ferry"))
                    .args(member),
            )?;
            if method == 1 { &mut ferries } else { &mut on_disk }.push(wall);
            let _ = std::fs::remove_dir_all(dir.join("ferry"));
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (fetch, local, ferry_wall) = (median(&mut fetches), median(&mut locals), median(&mut ferries));
    let (cleaned, disk_wall) = (median(&mut cleanups), median(&mut on_disk));
    let rows = vec![
        RestoreRow { gib, method: "aws s3 cp → zstd -d → etcdutl snapshot restore", wall: fetch },
        RestoreRow { gib, method: "zstd -d → etcdutl snapshot restore (object local)", wall: local },
        RestoreRow { gib, method: "the same, then rm the temporary snapshot", wall: cleaned },
        RestoreRow { gib, method: "ferry-agent restore (fetch + checks + restore)", wall: ferry_wall },
        RestoreRow { gib, method: "ferry-agent restore --scratch disk", wall: disk_wall },
    ];
    for r in &rows {
        eprintln!("[{gib:.2} GiB] {}: {:.2} s", r.method, r.wall.as_secs_f64());
    }
    Ok(rows)
}

fn print_restore_table(rows: &[RestoreRow]) {
    println!();
    println!(
        "| {:>6} | {:<50} | {:>7} | {:>14} | {:>17} | {:>15} |",
        "DB GiB", "restore method", "wall s", "× tools+fetch", "× tools (local)", "× tools + rm"
    );
    println!("|{:-<8}|{:-<52}|{:-<9}|{:-<16}|{:-<19}|{:-<17}|", "", "", "", "", "", "");
    for r in rows {
        let same: Vec<&RestoreRow> = rows.iter().filter(|o| (o.gib - r.gib).abs() < 1e-9).collect();
        let ratio = |prefix: &str| {
            same.iter()
                .find(|o| o.method.starts_with(prefix))
                .map(|o| format!("{:.2}", r.wall.as_secs_f64() / o.wall.as_secs_f64()))
                .unwrap_or_default()
        };
        println!(
            "| {:>6.2} | {:<50} | {:>7.2} | {:>14} | {:>17} | {:>15} |",
            r.gib,
            r.method,
            r.wall.as_secs_f64(),
            ratio("aws s3 cp"),
            ratio("zstd -d"),
            ratio("the same, then rm")
        );
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| {:>6} | {:<5} | {:>6} | {:<44} | {:>7} | {:>6} | {:>10} | {:>6} | {:>6} | {:>9} | {:>6} | {:>9} | {:>9} |",
        "DB GiB",
        "data",
        "ratio",
        "method",
        "wall s",
        "× save",
        "× pipeline",
        "MB/s",
        "CPU s",
        "× zstd -3",
        "RSS MiB",
        "disk MiB",
        "stored MiB"
    );
    println!(
        "|{:-<8}|{:-<7}|{:-<8}|{:-<46}|{:-<9}|{:-<8}|{:-<12}|{:-<8}|{:-<8}|{:-<11}|{:-<8}|{:-<11}|{:-<11}|",
        "", "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let same: Vec<&Row> = rows.iter().filter(|o| (o.gib - r.gib).abs() < 1e-9 && o.data == r.data).collect();
        let find = |p: &str| same.iter().find(|o| o.method.starts_with(p)).copied();
        let save = find("etcdctl snapshot save");
        let pipe = same.iter().find(|o| o.method.contains("aws s3 cp")).copied();
        let zstd3 = find("zstd -3 alone");
        let ratio = |b: Option<Duration>| {
            b.map(|b| format!("{:.2}", r.wall.as_secs_f64() / b.as_secs_f64())).unwrap_or_default()
        };
        // Compressibility of the data: the DB against what zstd -3 made of it.
        let compress = zstd3.map(|z| format!("{:.1}×", r.gib * (1u64 << 30) as f64 / z.stored as f64));
        let mbs = r.gib * 1024.0 * 1024.0 * 1024.0 / 1e6 / r.wall.as_secs_f64();
        println!(
            "| {:>6.2} | {:<5} | {:>6} | {:<44} | {:>7.2} | {:>6} | {:>10} | {:>6.0} | {:>6} | {:>9} | {:>7} | {:>9} | {:>10} |",
            r.gib,
            r.data,
            compress.unwrap_or_default(),
            r.method,
            r.wall.as_secs_f64(),
            ratio(save.map(|s| s.wall)),
            ratio(pipe.map(|p| p.wall)),
            mbs,
            r.cpu.map(|c| format!("{c:.2}")).unwrap_or_default(),
            match (r.cpu, zstd3.and_then(|z| z.cpu)) {
                (Some(c), Some(z)) if z > 0.0 => format!("{:.2}", c / z),
                _ => String::new(),
            },
            r.rss.map(mib).unwrap_or_else(|| "-".into()),
            r.disk_writes.map(mib).unwrap_or_default(),
            mib(r.stored)
        );
    }
}
