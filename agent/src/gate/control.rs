//! [`GateControl`]: the agent's side of the gate. It writes `command.json` and waits for `status.json` to
//! show the command applied; the gate (a separate process, etcd's parent) does the work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use super::protocol::{read_command, read_json, write_command, GateCommand, GateState, GateStatus, STATUS_FILE};

/// How often `status.json` is read while waiting: the gate polls `command.json` every 200 ms.
const STATUS_POLL: Duration = Duration::from_millis(100);

/// The agent's handle on the gate directory it shares with `ferry-agent gate`.
#[derive(Debug, Clone)]
pub struct GateControl {
    dir: PathBuf,
}

impl GateControl {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The gate directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// status.json as the gate last wrote it; Ok(None) when no gate ever wrote one.
    pub fn status(&self) -> anyhow::Result<Option<GateStatus>> {
        read_json(&self.dir, STATUS_FILE)
    }

    /// The command in force (command.json), default when missing.
    pub fn command(&self) -> anyhow::Result<GateCommand> {
        read_command(&self.dir)
    }

    /// Stop etcd and keep it stopped. Idempotent: when the current command already holds for this owner, no
    /// new generation is written (a hold of another owner, e.g. a failed earlier restore, is taken over: a new
    /// generation, etcd stays stopped). Returns once status.json shows `held` at that generation, or errors after
    /// `timeout` naming what the gate last reported (or that no gate answers).
    pub async fn hold(&self, owner: &str, timeout: Duration) -> anyhow::Result<GateStatus> {
        let current = self.command()?;
        let generation = if current.hold && current.owner == owner {
            current.generation
        } else {
            self.write_next(GateCommand { generation: 0, owner: owner.to_owned(), hold: true, overrides: vec![] })?
        };
        self.wait_for(generation, GateState::Held, timeout).await
    }

    /// Start etcd with these overrides (lifting a hold). Idempotent: when the current command is already
    /// exactly this (not held, same overrides), no new generation. Returns once status shows `running` at
    /// that generation.
    pub async fn start(
        &self,
        owner: &str,
        overrides: Vec<(String, String)>,
        timeout: Duration,
    ) -> anyhow::Result<GateStatus> {
        for (flag, _) in &overrides {
            anyhow::ensure!(
                flag.starts_with("--") && flag.len() > 2 && !flag.contains('='),
                "override flag `{flag}` is not an etcd flag name: write it as `--flag-name`, the value apart"
            );
        }
        let current = self.command()?;
        let generation = if !current.hold && current.overrides == overrides {
            current.generation
        } else {
            self.write_next(GateCommand { generation: 0, owner: owner.to_owned(), hold: false, overrides })?
        };
        self.wait_for(generation, GateState::Running, timeout).await
    }

    /// etcd's own args again: `start(owner, vec![], timeout)`.
    pub async fn release(&self, owner: &str, timeout: Duration) -> anyhow::Result<GateStatus> {
        self.start(owner, vec![], timeout).await
    }

    /// Writes `command` as the next generation: above both the command in force and what the gate applied
    /// last (a command.json deleted by hand restarts at 0, which the gate may have applied long ago).
    fn write_next(&self, mut command: GateCommand) -> anyhow::Result<u64> {
        let current = self.command()?;
        // An unreadable status only costs the second bound.
        let applied = self.status().ok().flatten().map_or(0, |s| s.applied_generation);
        command.generation = current.generation.max(applied) + 1;
        write_command(&self.dir, &command)
            .with_context(|| format!("write the gate command in {}", self.dir.display()))?;
        tracing::info!(
            gate_dir = %self.dir.display(),
            generation = command.generation,
            owner = %command.owner,
            hold = command.hold,
            overrides = ?command.overrides,
            "gate command written"
        );
        Ok(command.generation)
    }

    /// Waits until status.json shows `state` at `generation`.
    async fn wait_for(&self, generation: u64, state: GateState, timeout: Duration) -> anyhow::Result<GateStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // The gate replaces the file atomically, so a parse error is a real one; keep waiting anyway.
            let (last, last_error) = match self.status() {
                Ok(Some(status)) if status.applied_generation == generation && status.state == state => {
                    return Ok(status)
                }
                Ok(status) => (status, None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            if tokio::time::Instant::now() >= deadline {
                let what = format!(
                    "the gate in {} did not report etcd {state} at generation {generation} within {timeout:?}",
                    self.dir.display()
                );
                anyhow::bail!(match (last, last_error) {
                    (_, Some(e)) => format!("{what}: {e}"),
                    (Some(s), None) => format!(
                        "{what}; it last reported {} at generation {} (pid {}, owner `{}`, {} s ago)",
                        s.state,
                        s.applied_generation,
                        s.pid.map_or_else(|| "none".to_owned(), |p| p.to_string()),
                        s.owner,
                        super::process::unix_now().saturating_sub(s.updated_at_unix)
                    ),
                    (None, None) => format!(
                        "{what}: no gate ever answered there (no status.json). Is etcd's container running under \
                         `ferry-agent gate --gate-dir {}`?",
                        self.dir.display()
                    ),
                });
            }
            tokio::time::sleep(STATUS_POLL).await;
        }
    }
}
