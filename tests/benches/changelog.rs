//! Change-log benchmark (issue 30): what the continuous log of every etcd revision costs and how far behind it
//! runs, in one run.
//!
//! `cargo build --release --bins && cargo bench -p ferry-tests --bench changelog`
//!
//! For each kind of data (`FERRY_BENCH_DATA`, default `k8s,random`: the Kubernetes-like objects of the backup
//! bench, and the same keys with values of as many random bytes) it starts a fresh single-member etcd (quota
//! raised), a release coordinator with the local store (`--backup-store local`) and one release agent, and
//! runs, on the same etcd, one after another:
//! 1. `off`: puts at `FERRY_BENCH_RATE` revisions/s (default 500) for `FERRY_BENCH_BASE_SECS` (default 60) with
//!    the change log off: etcd's put latency without the watcher;
//! 2. `log`: the change log turned on (`spec.backupconfiguration.pointintime`), the same puts for
//!    `FERRY_BENCH_SECS` (default 90): put latency with the watcher, and each put's RPO — the time from the
//!    put's acknowledgement until the coordinator's `ferry_point_in_time_covered_revision` reaches its
//!    revision (scraped every 200 ms) — the stored bytes against the key + value bytes written, and the
//!    segments written (objects per cluster-day extrapolated from them);
//! 3. `ingest`: transactions of `FERRY_BENCH_INGEST_TXN` puts (default 20) at `FERRY_BENCH_INGEST_EVENTS`
//!    events/s (default 6 000; 0: as fast as etcd takes them) for `FERRY_BENCH_INGEST_SECS` (default 60; 0 skips
//!    the phase): the events/s the agent puts into segments (its `ferry_agent_changelog_revisions_total`) and
//!    its memory;
//! 4. `off` again (the log turned off): the baseline after, so that drift over the run shows.
//!
//! Writes come from `FERRY_BENCH_WRITERS` connections (default 4; `FERRY_BENCH_INGEST_WRITERS`, default 8, in
//! phase 3), each paced to its share of the rate.
//! etcd's history is compacted between phases (as the kube-apiserver does every 5 minutes), only once the log
//! covers it. Through phases 2 and 3 the watcher agent's VmRSS is read from /proc every second (start, peak,
//! end); each phase reports the CPU seconds (utime + stime from /proc) of the agent, the coordinator and etcd.
//! The coordinator's and agent's warnings and errors are counted and the first ones printed at the end.
//!
//! Runs on etcd 3.5 from `.tools/etcd-3.5` (`tests/setup.sh`; `FERRY_ETCD_DIR` picks another) with the
//! release binaries in target/release. Temp dirs under $TMPDIR (`FERRY_BENCH_KEEP=1` keeps them, with the
//! daemons' logs). Prints tables; it is a benchmark, never a pass/fail test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, Txn, TxnOp};
use ferry_tests::bench::fill::Gen;
use ferry_tests::bench::{cpu_seconds, release_bin, use_etcd_under_test, Proc};
use serde_json::{json, Value};

const CLUSTER: &str = "bench";
/// How often the coordinator's covered revision is scraped: the RPO's resolution.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The longest wait for the log to cover what was written once the writes stop.
const CATCH_UP: Duration = Duration::from_secs(180);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// What one run does (see the module's doc for the variables).
#[derive(Debug, Clone)]
struct Config {
    rate: u64,
    secs: u64,
    base_secs: u64,
    ingest_events: u64,
    ingest_txn: u64,
    ingest_secs: u64,
    writers: u64,
    ingest_writers: u64,
    kinds: Vec<Kind>,
}

impl Config {
    fn from_env() -> Self {
        let kinds = std::env::var("FERRY_BENCH_DATA")
            .unwrap_or_else(|_| "k8s,random".into())
            .split(',')
            .map(|k| if k.trim() == "random" { Kind::Random } else { Kind::K8s })
            .collect();
        Self {
            rate: env_u64("FERRY_BENCH_RATE", 500).max(1),
            secs: env_u64("FERRY_BENCH_SECS", 90),
            base_secs: env_u64("FERRY_BENCH_BASE_SECS", 60),
            ingest_events: env_u64("FERRY_BENCH_INGEST_EVENTS", 6000),
            ingest_txn: env_u64("FERRY_BENCH_INGEST_TXN", 20).max(1),
            ingest_secs: env_u64("FERRY_BENCH_INGEST_SECS", 60),
            writers: env_u64("FERRY_BENCH_WRITERS", 4).max(1),
            ingest_writers: env_u64("FERRY_BENCH_INGEST_WRITERS", 8).max(1),
            kinds,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The backup bench's Kubernetes-like objects.
    K8s,
    /// The same keys, each value as many random bytes as the object it stands for.
    Random,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::K8s => "k8s",
            Kind::Random => "random",
        }
    }
}

/// Keys and values of one kind, deterministic per seed.
struct Data {
    kind: Kind,
    gen: Gen,
    rng: u64,
    i: u64,
}

impl Data {
    fn new(kind: Kind, seed: u64) -> Self {
        Self {
            kind,
            gen: Gen::new(0x9E37_79B9_7F4A_7C15 ^ seed, 0),
            rng: seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1,
            i: seed,
        }
    }

    fn next(&mut self) -> (String, Vec<u8>) {
        self.i += 1;
        let (key, value) = self.gen.object(self.i);
        match self.kind {
            Kind::K8s => (key, value.into_bytes()),
            Kind::Random => {
                let mut v = vec![0u8; value.len()];
                for chunk in v.chunks_mut(8) {
                    self.rng ^= self.rng << 13;
                    self.rng ^= self.rng >> 7;
                    self.rng ^= self.rng << 17;
                    chunk.copy_from_slice(&self.rng.to_le_bytes()[..chunk.len()]);
                }
                (key, v)
            }
        }
    }
}

/// How compressible a kind is: zstd -3 over 16 MiB of its keys and values back to back (raw / compressed).
fn compressibility(kind: Kind) -> Result<f64> {
    let mut d = Data::new(kind, 0xC0FFEE);
    let mut raw = Vec::new();
    while raw.len() < 16 << 20 {
        let (k, v) = d.next();
        raw.extend_from_slice(k.as_bytes());
        raw.extend_from_slice(&v);
    }
    let z = zstd::encode_all(&raw[..], 3)?;
    Ok(raw.len() as f64 / z.len() as f64)
}

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

/// The body of `GET /metrics` on a local port.
fn scrape(port: u16) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the sample whose name and labels are exactly `series` (`name{labels}` or `name`).
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// VmRSS of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

/// p50, p99 and max (nearest rank).
fn percentiles(mut l: Vec<f64>) -> (f64, f64, f64) {
    if l.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    l.sort_by(f64::total_cmp);
    let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

/// The processes of one kind's run.
struct Ferry {
    dir: PathBuf,
    config: PathBuf,
    addr: String,
    etcd: String,
    metrics_port: u16,
    agent_metrics_port: u16,
    // Field order: the agent goes before the coordinator, both before etcd.
    agent: Option<Proc>,
    coordinator: Option<Proc>,
    etcd_proc: Option<Proc>,
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.agent = None;
        self.coordinator = None;
        self.etcd_proc = None;
    }
}

impl Ferry {
    fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("store"))?;
        let (cport, pport, qport) = (free_port()?, free_port()?, free_port()?);
        let etcd = format!("http://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{pport}");
        let etcd_proc = spawn(
            Command::new("etcd").args([
                "--name",
                "bench",
                "--data-dir",
                &dir.join("etcd").to_string_lossy(),
                "--listen-client-urls",
                &etcd,
                "--advertise-client-urls",
                &etcd,
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
        let mut ferry = Self {
            dir: dir.to_owned(),
            config: dir.join("state/admin.ferryconfig"),
            addr: format!("127.0.0.1:{qport}"),
            etcd,
            metrics_port: free_port()?,
            agent_metrics_port: free_port()?,
            agent: None,
            coordinator: None,
            etcd_proc: Some(etcd_proc),
        };
        let mut cmd = Command::new(release_bin("ferry-coordinator")?);
        cmd.arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", &ferry.addr, "--backup-store", "local", "--local-store-dir"])
            .arg(dir.join("store"))
            .args(["--metrics-listen", &format!("127.0.0.1:{}", ferry.metrics_port)]);
        ferry.coordinator = Some(spawn(&mut cmd, &dir.join("coordinator.log"))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while ferry.ctl(&["get", "agents"], None).is_err() {
            if Instant::now() > deadline {
                bail!("coordinator did not come up; see {}", dir.join("coordinator.log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ferry.start_agent()?;
        Ok(ferry)
    }

    fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write;
        let mut cmd = Command::new(release_bin("ferryctl")?);
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

    fn ctl_json(&self, args: &[&str]) -> Result<Value> {
        Ok(serde_json::from_str(&self.ctl(args, None)?)?)
    }

    fn start_agent(&mut self) -> Result<()> {
        let creds = self.dir.join("agent-creds");
        self.ctl(
            &["agent-credentials", "--cluster", CLUSTER, "--member", "m1", "--out", &creds.to_string_lossy()],
            None,
        )?;
        let mut cmd = Command::new(release_bin("ferry-agent")?);
        // As deploy/Containerfile and the systemd unit run it (FERRY_BENCH_GLIBC_DEFAULTS: without).
        if std::env::var_os("FERRY_BENCH_GLIBC_DEFAULTS").is_none() {
            cmd.env("MALLOC_MMAP_THRESHOLD_", "1048576");
        }
        cmd.args(["--coordinator", &self.addr, "--credentials"])
            .arg(&creds)
            .args(["--etcd-endpoints", &self.etcd])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.agent_metrics_port)])
            .arg("--spool-dir")
            .arg(self.dir.join("spool"));
        self.agent = Some(spawn(&mut cmd, &self.dir.join("agent.log"))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.ctl_json(&["get", "agents", "-o", "json"])?;
            if v.as_array().is_some_and(|a| {
                a.iter().any(|a| a["spec"]["connected"] == true && a["spec"]["dbsize"].as_i64() > Some(0))
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent did not connect; see {}", self.dir.join("agent.log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pids(&self) -> Pids {
        let id = |p: &Option<Proc>| p.as_ref().map_or(0, |p| p.0.id());
        Pids { agent: id(&self.agent), coordinator: id(&self.coordinator), etcd: id(&self.etcd_proc) }
    }

    /// Turns the change log on or off, as an operator would: the cluster resource applied with ferryctl.
    fn point_in_time(&self, enabled: bool) -> Result<()> {
        let mut r = self.ctl_json(&["get", "cluster", CLUSTER, "-o", "json"])?;
        r["spec"]["backupconfiguration"] = json!({
            "pointintime": { "enabled": enabled, "window": { "seconds": 86400, "nanos": 0 } },
        });
        self.ctl(&["apply", "-f", "-"], Some(&serde_json::to_string(&r)?))?;
        Ok(())
    }

    /// `spec.pointintime` of the cluster's `EtcdBackupStatuses`.
    fn pitr(&self) -> Result<Value> {
        Ok(self.ctl_json(&["get", "etcdbackupstatus", CLUSTER, "-o", "json"])?["spec"]["pointintime"].clone())
    }

    fn covered(&self) -> Option<i64> {
        let body = scrape(self.metrics_port).ok()?;
        metric(&body, &format!("ferry_point_in_time_covered_revision{{cluster=\"{CLUSTER}\"}}")).map(|v| v as i64)
    }

    /// Waits until the log covers `revision` (from the coordinator's metric); how long that took.
    fn wait_covered(&self, revision: i64) -> Result<Duration> {
        let t = Instant::now();
        while self.covered().unwrap_or(0) < revision {
            if t.elapsed() > CATCH_UP {
                bail!("revision {revision} not covered after {CATCH_UP:?}; status: {}", self.pitr()?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(t.elapsed())
    }

    /// Segments in the local store and their bytes (a check of the status' `segments` and `storedbytes`).
    fn stored_files(&self) -> (u64, u64) {
        fn walk(p: &Path, acc: &mut (u64, u64)) {
            let Ok(entries) = std::fs::read_dir(p) else { return };
            for e in entries.flatten() {
                let path = e.path();
                if path.is_dir() {
                    walk(&path, acc);
                } else if path.extension().is_some_and(|x| x == "fseg") {
                    acc.0 += 1;
                    acc.1 += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let mut acc = (0, 0);
        walk(&self.dir.join("store").join(CLUSTER).join("log"), &mut acc);
        acc
    }
}

#[derive(Debug, Clone, Copy)]
struct Pids {
    agent: u32,
    coordinator: u32,
    etcd: u32,
}

/// CPU seconds of the agent, the coordinator, etcd and this bench (its writers and samplers).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    agent: f64,
    coordinator: f64,
    etcd: f64,
    bench: f64,
}

impl Cpu {
    fn now(p: Pids) -> Self {
        Self {
            agent: cpu_seconds(&p.agent.to_string(), false),
            coordinator: cpu_seconds(&p.coordinator.to_string(), false),
            etcd: cpu_seconds(&p.etcd.to_string(), false),
            bench: cpu_seconds("self", false),
        }
    }
    fn since(self, before: Self) -> Self {
        Self {
            agent: self.agent - before.agent,
            coordinator: self.coordinator - before.coordinator,
            etcd: self.etcd - before.etcd,
            bench: self.bench - before.bench,
        }
    }
}

async fn current_revision(endpoint: &str) -> Result<i64> {
    let mut c = Client::connect([endpoint], None).await?;
    let r = c.get("/", None).await?;
    r.header().map(|h| h.revision()).context("revision")
}

/// Compacts etcd's history up to now, as the kube-apiserver does every 5 minutes.
async fn compact(endpoint: &str) -> Result<()> {
    let rev = current_revision(endpoint).await?;
    let mut c = Client::connect([endpoint], None).await?;
    c.compact(rev, None).await?;
    Ok(())
}

/// One acknowledged write: when it was acknowledged, its revision, its latency.
#[derive(Debug, Clone, Copy)]
struct Put {
    acked: Instant,
    revision: i64,
    latency: Duration,
}

#[derive(Debug, Default)]
struct Load {
    puts: Vec<Put>,
    /// Key + value bytes written.
    raw: u64,
    events: u64,
    wall: Duration,
}

/// Writes `revs_per_s` revisions per second of `per_txn` puts each (one put, or a transaction) for `secs`,
/// from `writers` connections each paced to its share (`revs_per_s` 0: each as fast as etcd answers).
async fn load(
    endpoint: &str,
    kind: Kind,
    seed: u64,
    revs_per_s: u64,
    per_txn: u64,
    secs: u64,
    writers: u64,
) -> Result<Load> {
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let endpoint = endpoint.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect([endpoint], None).await?;
            let mut data = Data::new(kind, seed.wrapping_mul(1_000_003) + w * 7919 + 1);
            let mut tick = (revs_per_s > 0).then(|| {
                let every = Duration::from_secs_f64(writers as f64 / revs_per_s as f64);
                let mut t = tokio::time::interval_at(
                    tokio::time::Instant::now() + every.mul_f64(w as f64 / writers as f64),
                    every,
                );
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let mut out = Load::default();
            while Instant::now() < end {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                let t = Instant::now();
                let revision = if per_txn == 1 {
                    let (k, v) = data.next();
                    out.raw += (k.len() + v.len()) as u64;
                    let r = client.put(k, v, None).await?;
                    r.header().map_or(0, |h| h.revision())
                } else {
                    let ops: Vec<TxnOp> = (0..per_txn)
                        .map(|_| {
                            let (k, v) = data.next();
                            out.raw += (k.len() + v.len()) as u64;
                            TxnOp::put(k, v, None)
                        })
                        .collect();
                    let r = client.txn(Txn::new().and_then(ops)).await?;
                    r.header().map_or(0, |h| h.revision())
                };
                let acked = Instant::now();
                out.events += per_txn;
                out.puts.push(Put { acked, revision, latency: acked - t });
            }
            anyhow::Ok(out)
        }));
    }
    let mut total = Load::default();
    for t in tasks {
        let l = t.await??;
        total.puts.extend(l.puts);
        total.raw += l.raw;
        total.events += l.events;
    }
    total.wall = start.elapsed();
    Ok(total)
}

/// What the samplers saw: the coordinator's covered revision and lag every 200 ms, the agent's RSS and
/// ingested revisions every second.
#[derive(Debug, Default)]
struct Samples {
    covered: Vec<(Instant, i64)>,
    lag_max: f64,
    /// (time, VmRSS bytes, `ferry_agent_changelog_revisions_total`)
    agent: Vec<(Instant, u64, f64)>,
    scrape_errors: u64,
}

struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Samples>,
}

impl Sampler {
    fn start(f: &Ferry) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (metrics_port, agent_port, pid) = (f.metrics_port, f.agent_metrics_port, f.pids().agent);
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = Samples::default();
                let covered = format!("ferry_point_in_time_covered_revision{{cluster=\"{CLUSTER}\"}}");
                let lag = format!("ferry_point_in_time_lag_seconds{{cluster=\"{CLUSTER}\"}}");
                let mut next_agent = Instant::now();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    match scrape(metrics_port) {
                        Ok(body) => {
                            if let Some(c) = metric(&body, &covered) {
                                s.covered.push((Instant::now(), c as i64));
                            }
                            s.lag_max = s.lag_max.max(metric(&body, &lag).unwrap_or(0.0));
                        }
                        Err(_) => s.scrape_errors += 1,
                    }
                    if Instant::now() >= next_agent {
                        let revisions = scrape(agent_port)
                            .ok()
                            .and_then(|b| metric(&b, "ferry_agent_changelog_revisions_total"))
                            .unwrap_or(f64::NAN);
                        s.agent.push((Instant::now(), rss(pid), revisions));
                        next_agent += Duration::from_secs(1);
                    }
                    next += SAMPLE_EVERY;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                s
            })
        };
        Self { stop, thread }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Each put's RPO, seconds: from its acknowledgement to the first sample (taken after it) showing a covered
/// revision at or past its own. `None` for a put never seen covered.
fn rpos(puts: &[Put], covered: &[(Instant, i64)]) -> (Vec<f64>, usize) {
    let mut out = Vec::with_capacity(puts.len());
    let mut missing = 0;
    for p in puts {
        // Covered only grows: the first sample at or past the revision, and not before the acknowledgement.
        let by_rev = covered.partition_point(|(_, c)| *c < p.revision);
        let by_time = covered.partition_point(|(t, _)| *t < p.acked);
        match covered.get(by_rev.max(by_time)) {
            Some((t, _)) => out.push(t.duration_since(p.acked).as_secs_f64()),
            None => missing += 1,
        }
    }
    (out, missing)
}

/// One phase's results.
#[derive(Debug, Clone, Default)]
struct Row {
    kind: &'static str,
    phase: String,
    load: LoadSummary,
    cpu: Cpu,
    /// With the log on:
    log: Option<LogSummary>,
}

#[derive(Debug, Clone, Default)]
struct LoadSummary {
    secs: f64,
    revisions: u64,
    events: u64,
    raw: u64,
    /// p50, p99, max of the put (or transaction) latency, ms.
    latency: (f64, f64, f64),
    /// Every latency, ms (for the pooled baseline).
    all: Vec<f64>,
}

#[derive(Debug, Clone, Default)]
struct LogSummary {
    /// p50, p99, max, seconds; puts never seen covered.
    rpo: (f64, f64, f64),
    uncovered: usize,
    lag_max: f64,
    /// From the end of the writes until the coordinator covered the last one.
    catch_up: f64,
    /// Events per second the agent put into segments: all of the phase's events over the time from the
    /// first write until its counter reached them.
    ingested_per_s: f64,
    rss_start: u64,
    rss_peak: u64,
    rss_end: u64,
    stored: u64,
    segments: u64,
}

fn summarize(l: &Load) -> LoadSummary {
    let all: Vec<f64> = l.puts.iter().map(|p| p.latency.as_secs_f64() * 1e3).collect();
    LoadSummary {
        secs: l.wall.as_secs_f64(),
        revisions: l.puts.len() as u64,
        events: l.events,
        raw: l.raw,
        latency: percentiles(all.clone()),
        all,
    }
}

/// One phase with the log on: the writes, then the wait until the log covers them; what it cost.
#[allow(clippy::too_many_arguments)]
async fn logged_phase(
    f: &Ferry,
    kind: Kind,
    phase: &str,
    seed: u64,
    revs_per_s: u64,
    per_txn: u64,
    secs: u64,
    writers: u64,
) -> Result<Row> {
    let before = f.pitr()?;
    let files_before = f.stored_files();
    let cpu = Cpu::now(f.pids());
    let sampler = Sampler::start(f);
    let started = Instant::now();
    let l = load(&f.etcd, kind, seed, revs_per_s, per_txn, secs, writers).await?;
    let last = l.puts.iter().map(|p| p.revision).max().unwrap_or(0);
    let catch_up = tokio::task::block_in_place(|| f.wait_covered(last))?;
    // A few more samples: the RSS after the burst.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sampler.finish();
    let cpu = Cpu::now(f.pids()).since(cpu);
    let after = f.pitr()?;
    let files_after = f.stored_files();
    let (rpo, uncovered) = rpos(&l.puts, &s.covered);
    let revisions_at = |t: Option<&(Instant, u64, f64)>| t.map_or(0.0, |x| x.2);
    let first_revs = revisions_at(s.agent.first());
    let final_revs = revisions_at(s.agent.last());
    // When the agent's counter reached the phase's revisions.
    let reached = s
        .agent
        .iter()
        .find(|(_, _, r)| *r >= final_revs - 0.5 && final_revs > first_revs)
        .map_or(l.wall, |(t, _, _)| t.duration_since(started));
    let ingested = (final_revs - first_revs) * per_txn as f64;
    let rsses: Vec<u64> = s.agent.iter().map(|a| a.1).collect();
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let stored = n(&after, "storedbytes").saturating_sub(n(&before, "storedbytes"));
    let segments = n(&after, "segments").saturating_sub(n(&before, "segments"));
    eprintln!(
        "  [{}] {phase}: status {segments} segments / {stored} B; store dir {} segments / {} B; {} scrape errors",
        kind.name(),
        files_after.0 - files_before.0,
        files_after.1 - files_before.1,
        s.scrape_errors
    );
    Ok(Row {
        kind: kind.name(),
        phase: phase.into(),
        load: summarize(&l),
        cpu,
        log: Some(LogSummary {
            rpo: percentiles(rpo),
            uncovered,
            lag_max: s.lag_max,
            catch_up: catch_up.as_secs_f64(),
            ingested_per_s: ingested / reached.as_secs_f64().max(1e-9),
            rss_start: rsses.first().copied().unwrap_or(0),
            rss_peak: rsses.iter().copied().max().unwrap_or(0),
            rss_end: rsses.last().copied().unwrap_or(0),
            stored,
            segments,
        }),
    })
}

async fn plain_phase(f: &Ferry, kind: Kind, phase: &str, seed: u64, c: &Config) -> Result<Row> {
    let cpu = Cpu::now(f.pids());
    let l = load(&f.etcd, kind, seed, c.rate, 1, c.base_secs, c.writers).await?;
    Ok(Row {
        kind: kind.name(),
        phase: phase.into(),
        load: summarize(&l),
        cpu: Cpu::now(f.pids()).since(cpu),
        log: None,
    })
}

/// Warnings and errors in a daemon's log: how many, and the first few.
fn log_findings(path: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let bad: Vec<String> =
        text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).map(str::to_owned).collect();
    (bad.len(), bad.into_iter().take(8).collect())
}

async fn bench_kind(c: &Config, kind: Kind, n: usize, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-changelog-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let name = kind.name();
    let f = tokio::task::block_in_place(|| Ferry::start(&dir))?;
    eprintln!("[{name}] etcd, coordinator and agent up in {}", dir.display());
    // Warm-up, not measured: connections, etcd's first pages.
    load(&f.etcd, kind, 1, c.rate, 1, 5, c.writers).await?;

    eprintln!("[{name}] off: {} puts/s for {} s, the change log off…", c.rate, c.base_secs);
    rows.push(plain_phase(&f, kind, "off (before)", 2, c).await?);
    compact(&f.etcd).await?;

    eprintln!("[{name}] turning the change log on…");
    tokio::task::block_in_place(|| -> Result<()> {
        f.point_in_time(true)?;
        let t = Instant::now();
        // The status may not exist before the log's first record.
        while f.pitr().ok().and_then(|p| p["startrevision"].as_i64()).unwrap_or(0) <= 0 {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the change log did not start: {}", f.pitr()?);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })?;
    let now = current_revision(&f.etcd).await?;
    let t = tokio::task::block_in_place(|| f.wait_covered(now))?;
    eprintln!("[{name}] log started and covering revision {now} after {:.1} s", t.as_secs_f64());

    eprintln!("[{name}] log: {} puts/s for {} s…", c.rate, c.secs);
    rows.push(logged_phase(&f, kind, "log on", 3, c.rate, 1, c.secs, c.writers).await?);
    compact(&f.etcd).await?;

    // FERRY_BENCH_INGEST_SECS=0: no ingest phase (off, log, off: only the latency bracket).
    if c.ingest_secs > 0 {
        let txn_rate = c.ingest_events / c.ingest_txn;
        eprintln!(
            "[{name}] ingest: transactions of {} puts at {} events/s for {} s…",
            c.ingest_txn,
            if txn_rate == 0 { "as many".to_string() } else { (txn_rate * c.ingest_txn).to_string() },
            c.ingest_secs
        );
        let ingest_label = format!("log on, txns of {}", c.ingest_txn);
        rows.push(
            logged_phase(&f, kind, &ingest_label, 4, txn_rate, c.ingest_txn, c.ingest_secs, c.ingest_writers).await?,
        );
        compact(&f.etcd).await?;
    }

    let status = tokio::task::block_in_place(|| f.pitr())?;
    notes.push(format!(
        "[{name}] change log at the end: covered revision {}, {} segments, {} stored bytes, gaps {}, error {:?}",
        status["coveredrevision"], status["segments"], status["storedbytes"], status["gaps"], status["error"]
    ));
    tokio::task::block_in_place(|| f.point_in_time(false))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("[{name}] off again: {} puts/s for {} s…", c.rate, c.base_secs);
    rows.push(plain_phase(&f, kind, "off (after)", 5, c).await?);

    if let Ok(body) = scrape(f.agent_metrics_port) {
        let gaps = metric(&body, "ferry_agent_changelog_gaps_total").unwrap_or(f64::NAN);
        let segs = metric(&body, "ferry_agent_changelog_segments_total").unwrap_or(f64::NAN);
        notes.push(format!("[{name}] agent: {segs} segments sealed, {gaps} gaps reported"));
    }
    for (who, log) in [("coordinator", "coordinator.log"), ("agent", "agent.log"), ("etcd", "etcd.log")] {
        if who == "etcd" {
            // etcd logs JSON; its slow-request warnings are what matter here.
            let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            let slow = text.lines().filter(|l| l.contains("apply request took too long")).count();
            notes.push(format!("[{name}] etcd: {slow} \"apply request took too long\" warnings"));
            continue;
        }
        let (count, first) = log_findings(&dir.join(log));
        notes.push(format!("[{name}] {who}: {count} WARN/ERROR lines"));
        for l in first {
            notes.push(format!("    {l}"));
        }
    }
    drop(f);
    if std::env::var_os("FERRY_BENCH_KEEP").is_some() {
        // The logs are what is worth keeping; etcd's data is large.
        let _ = std::fs::remove_dir_all(dir.join("etcd"));
        eprintln!("[{name}] kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn print_tables(c: &Config, rows: &[Row], ratios: &[(Kind, f64)]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "Change log, {cores} cores, single-member etcd, local store; {} revisions/s (1 put each) from {} writers; \
         transactions of {} puts at {} events/s from {} writers",
        c.rate,
        c.writers,
        c.ingest_txn,
        if c.ingest_events == 0 { "full speed".to_string() } else { c.ingest_events.to_string() },
        c.ingest_writers
    );
    for (k, r) in ratios {
        println!("data {}: zstd -3 over 16 MiB of its keys and values: {r:.2}×", k.name());
    }
    println!();
    println!("etcd write latency (a put, or a transaction in the txns row):");
    println!(
        "| {:<6} | {:<18} | {:>5} | {:>8} | {:>8} | {:>7} | {:>7} | {:>8} | {:>10} | {:>10} |",
        "data", "phase", "s", "writes/s", "events/s", "p50 ms", "p99 ms", "max ms", "p99 × off", "max × off"
    );
    println!(
        "|{:-<8}|{:-<20}|{:-<7}|{:-<10}|{:-<10}|{:-<9}|{:-<9}|{:-<10}|{:-<12}|{:-<12}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let (p99, max) = off_baseline(rows, r.kind);
        let l = &r.load;
        let single = !r.phase.contains("txns");
        println!(
            "| {:<6} | {:<18} | {:>5.0} | {:>8.0} | {:>8.0} | {:>7.2} | {:>7.2} | {:>8.1} | {:>10} | {:>10} |",
            r.kind,
            r.phase,
            l.secs,
            l.revisions as f64 / l.secs,
            l.events as f64 / l.secs,
            l.latency.0,
            l.latency.1,
            l.latency.2,
            if single { format!("{:.3}", l.latency.1 / p99) } else { "-".into() },
            if single { format!("{:.2}", l.latency.2 / max) } else { "-".into() },
        );
    }
    let mut kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
    kinds.dedup();
    for k in &kinds {
        let (p99, max) = off_baseline(rows, k);
        println!("  {k}: both off phases pooled: p99 {p99:.2} ms, max {max:.1} ms (the × off columns' base)");
    }
    println!();
    println!("The log (RPO: put acknowledged → coordinator's covered revision ≥ its revision, sampled every 200 ms):");
    println!(
        "| {:<6} | {:<18} | {:>8} | {:>8} | {:>7} | {:>7} | {:>7} | {:>7} | {:>8} | {:>9} | {:>16} | {:>8} | {:>8} | {:>7} | {:>4} | {:>6} | {:>7} |",
        "data",
        "phase",
        "events/s",
        "ingest/s",
        "RPO p50",
        "RPO p99",
        "RPO max",
        "lag max",
        "catch-up",
        "agent CPU",
        "agent RSS MiB",
        "coord CPU",
        "etcd CPU",
        "stored",
        "segs",
        "segs/h",
        "objs/day"
    );
    println!(
        "|{:-<8}|{:-<20}|{:-<10}|{:-<10}|{:-<9}|{:-<9}|{:-<9}|{:-<9}|{:-<10}|{:-<11}|{:-<18}|{:-<10}|{:-<10}|{:-<9}|{:-<6}|{:-<8}|{:-<9}|",
        "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let Some(g) = &r.log else { continue };
        let l = &r.load;
        let per_hour = g.segments as f64 * 3600.0 / l.secs;
        println!(
            "| {:<6} | {:<18} | {:>8.0} | {:>8.0} | {:>7.2} | {:>7.2} | {:>7.2} | {:>7.0} | {:>8.1} | {:>9.2} | {:>16} | {:>8.2} | {:>8.2} | {:>7.3} | {:>4} | {:>6.0} | {:>7.0} |",
            r.kind,
            r.phase,
            l.events as f64 / l.secs,
            g.ingested_per_s,
            g.rpo.0,
            g.rpo.1,
            g.rpo.2,
            g.lag_max,
            g.catch_up,
            r.cpu.agent,
            format!("{:.1}/{:.1}/{:.1}", mib(g.rss_start as f64), mib(g.rss_peak as f64), mib(g.rss_end as f64)),
            r.cpu.coordinator,
            r.cpu.etcd,
            g.stored as f64 / l.raw.max(1) as f64,
            g.segments,
            per_hour,
            per_hour * 24.0
        );
    }
    println!();
    println!("Per phase: raw = key + value bytes written; stored = the log's bytes for them (status `storedbytes`).");
    for r in rows {
        let stored = r.log.as_ref().map(|g| format!(", stored {:.1} MiB", mib(g.stored as f64))).unwrap_or_default();
        let uncovered =
            r.log.as_ref().map(|g| format!(", {} writes never seen covered", g.uncovered)).unwrap_or_default();
        println!(
            "  {} {}: {} writes, {} events ({:.0} B each), raw {:.1} MiB{stored}{uncovered}; CPU s: agent {:.2}, \
             coordinator {:.2}, etcd {:.2}, bench (writers, samplers) {:.2}",
            r.kind,
            r.phase,
            r.load.revisions,
            r.load.events,
            r.load.raw as f64 / r.load.events.max(1) as f64,
            mib(r.load.raw as f64),
            r.cpu.agent,
            r.cpu.coordinator,
            r.cpu.etcd,
            r.cpu.bench
        );
    }
}

/// The targets against what was measured, ✓ met or ✗ missed.
fn print_targets(c: &Config, rows: &[Row]) {
    let mark = |ok: bool| if ok { "✓" } else { "✗" };
    println!();
    println!("Targets (issue 30):");
    for r in rows.iter().filter(|r| r.phase == "log on") {
        let Some(g) = &r.log else { continue };
        let (p99, max) = off_baseline(rows, r.kind);
        let rate = r.load.revisions as f64 / r.load.secs;
        println!(
            "  {} RPO p99 ≤ 15 s at {rate:.0} revisions/s [{}]: {:.2} s (max {:.2} s)",
            mark(g.rpo.1 <= 15.0),
            r.kind,
            g.rpo.1,
            g.rpo.2
        );
        let (rp99, rmax) = (r.load.latency.1 / p99, r.load.latency.2 / max);
        println!(
            "  {} put p99 with the watcher ≤ 1.05× without [{}]: {:.2} / {p99:.2} ms = {rp99:.3}×",
            mark(rp99 <= 1.05),
            r.kind,
            r.load.latency.1
        );
        println!(
            "  {} put max with the watcher ≤ 1.05× without [{}]: {:.1} / {max:.1} ms = {rmax:.2}×",
            mark(rmax <= 1.05),
            r.kind,
            r.load.latency.2
        );
        let ratio = g.stored as f64 / r.load.raw.max(1) as f64;
        let target = if r.kind == "k8s" { "" } else { " (the target is for Kubernetes-like data)" };
        println!("  {} stored ≤ 0.25× raw [{}]: {ratio:.3}×{target}", mark(ratio <= 0.25), r.kind);
        let per_day = g.segments as f64 * 3600.0 * 24.0 / r.load.secs;
        println!(
            "  {} objects per busy cluster-day ≤ 400 [{}]: {per_day:.0} at {rate:.0} revisions/s (no merging built)",
            mark(per_day <= 400.0),
            r.kind
        );
    }
    for r in rows.iter().filter(|r| r.phase.contains("txns")) {
        let Some(g) = &r.log else { continue };
        println!(
            "  {} agent ingests ≥ 5 000 events/s [{}]: {:.0} events/s ({:.0} offered{})",
            mark(g.ingested_per_s >= 5000.0),
            r.kind,
            g.ingested_per_s,
            r.load.events as f64 / r.load.secs,
            if c.ingest_events == 0 { ", full speed" } else { "" }
        );
    }
    for k in ["k8s", "random"] {
        let logged: Vec<&LogSummary> = rows.iter().filter(|r| r.kind == k).filter_map(|r| r.log.as_ref()).collect();
        if logged.is_empty() {
            continue;
        }
        let peak = logged.iter().map(|g| g.rss_peak).max().unwrap_or(0);
        let (start, end) = (logged[0].rss_start, logged[logged.len() - 1].rss_end);
        println!(
            "  {} agent RSS ≤ 48 MiB with the log on [{k}]: start {:.1}, peak {:.1}, end {:.1} MiB",
            mark(mib(peak as f64) <= 48.0),
            mib(start as f64),
            mib(peak as f64),
            mib(end as f64)
        );
    }
}

/// The p99 and max put latency with the log off: the puts of both off phases of `kind` pooled.
fn off_baseline(rows: &[Row], kind: &str) -> (f64, f64) {
    let off: Vec<f64> =
        rows.iter().filter(|r| r.kind == kind && r.log.is_none()).flat_map(|r| r.load.all.iter().copied()).collect();
    let (_, p99, max) = percentiles(off);
    (p99, max)
}

fn main() -> Result<()> {
    let etcd = use_etcd_under_test()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let c = Config::from_env();
    println!("machine: {cores} cores; {etcd}; {c:?}");
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench(c))
}

async fn bench(c: Config) -> Result<()> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut ratios = Vec::new();
    for (n, kind) in c.kinds.iter().enumerate() {
        ratios.push((*kind, compressibility(*kind)?));
        bench_kind(&c, *kind, n, &mut rows, &mut notes).await?;
    }
    print_tables(&c, &rows, &ratios);
    print_targets(&c, &rows);
    println!();
    for n in notes {
        println!("{n}");
    }
    Ok(())
}
