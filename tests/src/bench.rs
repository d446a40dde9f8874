//! What the benchmarks share: the release binaries they run, the etcd they run against, the processes they
//! start and what those cost; [`fill`] writes their test data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};

pub mod fill;

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A release binary beside the running bench (`target/release/deps/NAME-xxxx` → `target/release/NAME`).
pub fn release_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("bench binary location")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} not found: run `cargo build --release --bins` first", p.display());
    }
    Ok(p)
}

/// CPU seconds (user + system) from `/proc/<pid>/stat`: the process's own (`children` false) or that of its
/// waited-for children.
pub fn cpu_seconds(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's closing parenthesis, from field 3 (state) on.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let at = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let (u, s) = if children { (13, 14) } else { (11, 12) };
    // Clock ticks: 100 per second on Linux.
    (at(u) + at(s)) / 100.0
}

/// Peak RSS (VmHWM) and bytes written to storage by a process.
pub fn proc_stats(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let writes = io
        .lines()
        .find(|l| l.starts_with("write_bytes:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    (hwm, writes)
}

/// Puts the etcd under test first on PATH, for this process and every program it starts; returns its
/// version line.
pub fn use_etcd_under_test() -> Result<String> {
    let dir = etcd_dir();
    if !dir.join("etcd").is_file() {
        bail!("no etcd in {}: run tests/setup.sh (or set FERRY_ETCD_DIR)", dir.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let joined = std::env::join_paths(std::iter::once(dir.clone()).chain(std::env::split_paths(&path)))?;
    // Single-threaded here: set before the runtime starts any task that reads the environment.
    std::env::set_var("PATH", joined);
    let out = Command::new(dir.join("etcd")).arg("--version").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_owned())
}

/// Where the etcd under test is: `FERRY_ETCD_DIR`, else `.tools/etcd-3.5/usr/bin` (`tests/setup.sh` puts it there).
pub fn etcd_dir() -> PathBuf {
    std::env::var_os("FERRY_ETCD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/etcd-3.5/usr/bin"))
}
