//! What the benchmarks share: the release binaries they run and the processes they start.

use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{bail, Context, Result};

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
