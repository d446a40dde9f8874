//! The gate process: etcd's parent. It starts etcd at once on its own arguments (plus the overrides of the
//! command in force), forwards SIGTERM/SIGINT/SIGHUP to it and exits with its exit code; meanwhile it polls
//! `command.json` and holds, restarts or releases etcd as the agent asks. It never touches the network, so
//! nothing but etcd's own start can delay etcd.
//!
//! One task owns everything (the child, the command applied, the signal streams); a command is applied to
//! completion before the next event is looked at, so there is never a second etcd nor a half-applied state.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustix::process::{kill_process, Pid, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, info_span, warn, Instrument as _};

use super::protocol::{
    effective_args, env_var, read_command, write_status, EtcdArgs, GateCommand, GateState, GateStatus, COMMAND_FILE,
};

/// How often `command.json` is read: a hold takes effect within this (plus etcd's stop).
const COMMAND_POLL: Duration = Duration::from_millis(200);
/// How long the data dir's bbolt file may stay locked after etcd was reaped before the gate says so: the lock
/// goes with the process, so only another process holding the file (a second etcd on the same dir) keeps it.
const UNLOCK_WAIT: Duration = Duration::from_secs(10);
/// Between two tries of that lock.
const UNLOCK_RETRY: Duration = Duration::from_millis(100);
/// `--stop-timeout`'s default: etcd stops in well under a second; a slow disk may need a few.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What `ferry-agent gate` was given.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// The directory shared with the agent (`command.json`, `status.json`).
    pub gate_dir: PathBuf,
    /// etcd's data dir, whose `member/snap/db` must be unlocked before a hold is reported.
    pub data_dir: PathBuf,
    /// SIGTERM to SIGKILL.
    pub stop_timeout: Duration,
    /// etcd's command line: the program, then its arguments.
    pub command: Vec<String>,
    /// `--start-held`: with no command.json yet (a member never started), hold etcd from the start, so that
    /// a new cluster is restored from a backup before its etcd serves for the first time.
    pub start_held: bool,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs the gate until etcd exits or the gate is told to stop; returns the exit code the process must exit
/// with (etcd's, or 128 + the signal that killed it; 0 when stopped while held). An `Err` is a refusal to
/// start (bad arguments, an unusable gate dir, an invalid command.json) or a failure to start etcd.
pub async fn run(config: GateConfig) -> anyhow::Result<i32> {
    let span = info_span!("gate", gate_dir = %config.gate_dir.display());
    async {
        let mut gate = Gate::prepare(config)?;
        gate.serve().await
    }
    .instrument(span)
    .await
}

/// etcd while the gate runs it.
struct Running {
    child: tokio::process::Child,
    pid: u32,
}

struct Gate {
    config: GateConfig,
    program: String,
    base_args: Vec<String>,
    etcd: EtcdArgs,
    /// The command applied last (its generation is the one status.json reports).
    applied: GateCommand,
    child: Option<Running>,
    /// The last error reading command.json while running, logged once rather than every poll.
    last_bad_command: Option<String>,
}

impl Gate {
    /// Checks the arguments and the gate dir, and reads the command in force; starts nothing.
    fn prepare(config: GateConfig) -> anyhow::Result<Self> {
        let Some((program, base_args)) = config.command.split_first() else {
            anyhow::bail!(
                "no etcd command after `--`: give etcd's command line last, e.g. \
                 `ferry-agent gate --gate-dir /var/lib/ferry/gate --data-dir /var/lib/etcd -- etcd --name=m1 …`"
            );
        };
        let dir = &config.gate_dir;
        create_gate_dir(dir).with_context(|| {
            format!(
                "create --gate-dir {} (it must be a directory this user can write: the agent sidecar shares it)",
                dir.display()
            )
        })?;
        if config.start_held && !dir.join(COMMAND_FILE).exists() {
            let hold = GateCommand { generation: 1, owner: "bootstrap".into(), hold: true, overrides: Vec::new() };
            super::protocol::write_command(dir, &hold)
                .with_context(|| format!("--start-held: write {}", dir.join(COMMAND_FILE).display()))?;
            info!("--start-held: etcd waits for its restore (the coordinator's restoreFrom) before it first starts");
        }
        let applied = read_command(dir).with_context(|| {
            format!(
                "read {} at start: fix or remove it (the agent writes it; a missing file means \"run etcd on its \
                 own arguments\")",
                dir.join(COMMAND_FILE).display()
            )
        })?;
        let etcd = EtcdArgs::parse_with_env(
            base_args,
            |var| std::env::var(var).ok().filter(|v| !v.is_empty()),
            &config.data_dir.display().to_string(),
        );
        Ok(Self {
            program: program.clone(),
            base_args: base_args.to_vec(),
            etcd,
            applied,
            child: None,
            last_bad_command: None,
            config,
        })
    }

    async fn serve(&mut self) -> anyhow::Result<i32> {
        // Before etcd exists, so that no signal meant for it is lost.
        let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;

        // The first status written is also the check that the gate dir is writable.
        let not_writable = |dir: &Path| {
            format!("--gate-dir {} is not writable by this user (the gate writes status.json there)", dir.display())
        };
        if self.applied.hold {
            info!(
                generation = self.applied.generation,
                owner = %self.applied.owner,
                "command.json holds this member: etcd is not started"
            );
            self.report_strict(GateState::Held, None).with_context(|| not_writable(&self.config.gate_dir))?;
        } else {
            self.report_strict(GateState::Starting, None).with_context(|| not_writable(&self.config.gate_dir))?;
            self.spawn()?;
        }

        let mut poll = tokio::time::interval(COMMAND_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                exit = child_exit(&mut self.child) => {
                    let status = exit.context("wait for etcd")?;
                    self.child = None;
                    warn!(
                        %status,
                        "etcd exited on its own; the gate exits with its code so that the container (or unit) is \
                         restarted, and applies command.json again then"
                    );
                    self.report(GateState::Stopping, None);
                    return Ok(exit_code(status));
                }
                _ = term.recv() => return Ok(self.shutdown(Signal::TERM).await),
                _ = int.recv() => return Ok(self.shutdown(Signal::INT).await),
                _ = hup.recv() => match &self.child {
                    Some(running) => {
                        info!(pid = running.pid, "forwarding SIGHUP to etcd");
                        send(running.pid, Signal::HUP);
                    }
                    None => info!("SIGHUP while etcd is held: nothing to forward"),
                },
                _ = poll.tick() => self.poll_command().await?,
            }
        }
    }

    /// Reads command.json and applies it when its generation is new. An invalid file is logged (once per
    /// distinct error) and ignored: the last applied state stays.
    async fn poll_command(&mut self) -> anyhow::Result<()> {
        let command = match read_command(&self.config.gate_dir) {
            Ok(command) => {
                self.last_bad_command = None;
                command
            }
            Err(e) => {
                let e = format!("{e:#}");
                if self.last_bad_command.as_ref() != Some(&e) {
                    error!("failed to read the gate command, keeping the state applied last: {e}");
                    self.last_bad_command = Some(e);
                }
                return Ok(());
            }
        };
        if command.generation == self.applied.generation {
            return Ok(());
        }
        info!(
            generation = command.generation,
            owner = %command.owner,
            hold = command.hold,
            overrides = ?command.overrides,
            "applying a new gate command"
        );
        if command.hold {
            self.hold(command).await;
            Ok(())
        } else {
            self.restart(command).await
        }
    }

    /// Stops etcd (when it runs), waits until its data dir is unlocked, and reports `held`. Should the lock
    /// stay taken, `held` is not reported and the next poll tries again; etcd is not started either way.
    async fn hold(&mut self, command: GateCommand) {
        if let Some(pid) = self.child.as_ref().map(|r| r.pid) {
            self.report(GateState::Stopping, Some(pid));
            let status = self.stop(Signal::TERM).await;
            info!(status = %describe(status.as_ref()), "etcd stopped for the hold");
        }
        if let Err(e) = wait_unlocked(&self.config.data_dir).await {
            error!("failed to hold: {e:#}; trying again");
            self.report(GateState::Stopping, None);
            return;
        }
        self.applied = command;
        info!(generation = self.applied.generation, owner = %self.applied.owner, "etcd held");
        self.report(GateState::Held, None);
    }

    /// Stops etcd (when it runs) and starts it with the command's overrides.
    async fn restart(&mut self, command: GateCommand) -> anyhow::Result<()> {
        if let Some(pid) = self.child.as_ref().map(|r| r.pid) {
            self.report(GateState::Stopping, Some(pid));
            let status = self.stop(Signal::TERM).await;
            info!(status = %describe(status.as_ref()), "etcd stopped, to start again with new arguments");
        }
        self.applied = command;
        self.report(GateState::Starting, None);
        self.spawn()
    }

    /// Spawns etcd with the applied command's overrides and reports `running`.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let args = effective_args(&self.base_args, &self.applied.overrides);
        // stdin, stdout and stderr inherited: the container's log is etcd's log.
        let mut command = tokio::process::Command::new(&self.program);
        command.args(&args);
        for (flag, _) in &self.applied.overrides {
            // etcd refuses a flag given both as an argument and in its environment.
            command.env_remove(env_var(flag));
        }
        let child = command.spawn().with_context(|| format!("start etcd (`{}`)", self.program))?;
        let pid = child.id().context("etcd exited before its pid was read")?;
        info!(pid, generation = self.applied.generation, args = ?args, "etcd started");
        self.child = Some(Running { child, pid });
        self.report(GateState::Running, Some(pid));
        Ok(())
    }

    /// Sends `sig` to etcd and waits for it to exit, SIGKILL after `--stop-timeout`. `None` when no etcd ran.
    async fn stop(&mut self, sig: Signal) -> Option<std::io::Result<ExitStatus>> {
        let mut running = self.child.take()?;
        send(running.pid, sig);
        let timeout = self.config.stop_timeout;
        Some(match tokio::time::timeout(timeout, running.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                warn!(pid = running.pid, "etcd did not exit within {timeout:?} (--stop-timeout); killing it");
                match running.child.kill().await {
                    Ok(()) => running.child.wait().await,
                    Err(e) => Err(e),
                }
            }
        })
    }

    /// SIGTERM or SIGINT to the gate: etcd gets it too, and the gate exits with etcd's code (0 when held).
    async fn shutdown(&mut self, sig: Signal) -> i32 {
        let Some(pid) = self.child.as_ref().map(|r| r.pid) else {
            info!("stop signal while etcd is held; exiting");
            return 0;
        };
        info!(pid, signal = sig.as_raw(), "forwarding the stop signal to etcd");
        self.report(GateState::Stopping, Some(pid));
        let status = self.stop(sig).await;
        info!(status = %describe(status.as_ref()), "etcd stopped; the gate exits");
        self.report(GateState::Stopping, None);
        match status {
            Some(Ok(status)) => exit_code(status),
            _ => 1,
        }
    }

    fn status(&self, state: GateState, pid: Option<u32>) -> GateStatus {
        GateStatus {
            applied_generation: self.applied.generation,
            state,
            pid,
            owner: self.applied.owner.clone(),
            overrides: self.applied.overrides.clone(),
            etcd: self.etcd.clone(),
            base_args: self.base_args.clone(),
            effective_args: effective_args(&self.base_args, &self.applied.overrides),
            updated_at_unix: unix_now(),
            gate_pid: std::process::id(),
        }
    }

    fn report_strict(&self, state: GateState, pid: Option<u32>) -> anyhow::Result<()> {
        write_status(&self.config.gate_dir, &self.status(state, pid))
    }

    /// Writes status.json; a failure is logged, never a reason to touch etcd.
    fn report(&self, state: GateState, pid: Option<u32>) {
        if let Err(e) = self.report_strict(state, pid) {
            error!("failed to report the gate's state ({state}): {e:#}");
        }
    }
}

/// Creates the gate dir 0700 when missing (with its parents); an existing one is left as it is.
fn create_gate_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    if !std::fs::metadata(dir)?.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok(())
}

/// Resolves when etcd exits; never while none runs.
async fn child_exit(child: &mut Option<Running>) -> std::io::Result<ExitStatus> {
    match child {
        Some(running) => running.child.wait().await,
        None => std::future::pending().await,
    }
}

/// A process's exit code as a shell reports it: its own, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn describe(status: Option<&std::io::Result<ExitStatus>>) -> String {
    match status {
        None => "not running".to_owned(),
        Some(Ok(status)) => status.to_string(),
        Some(Err(e)) => format!("not known ({e})"),
    }
}

/// Sends `sig` to `pid`; one that already exited is fine.
fn send(pid: u32, sig: Signal) {
    let Some(target) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    match kill_process(target, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => warn!(pid, "failed to signal etcd: {e}"),
    }
}

/// Whether a live etcd holds `data_dir` (it keeps `member/snap/db` locked while it runs): what the agent
/// checks before it renames a held member's data dir.
pub fn data_dir_in_use(data_dir: &Path) -> anyhow::Result<bool> {
    is_locked(&data_dir.join("member").join("snap").join("db"))
}

/// Waits until `data_dir/member/snap/db` can be locked exclusively (etcd locks it while it runs; a missing
/// file is fine), for at most [`UNLOCK_WAIT`].
async fn wait_unlocked(data_dir: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + UNLOCK_WAIT;
    loop {
        if !data_dir_in_use(data_dir)? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{}/member/snap/db is still locked {UNLOCK_WAIT:?} after etcd exited: another process (a second \
                 etcd on the same data dir?) holds it",
                data_dir.display()
            );
        }
        tokio::time::sleep(UNLOCK_RETRY).await;
    }
}

/// Whether some process holds `db` locked (the lock taken here is released at once, when the file closes).
fn is_locked(db: &Path) -> anyhow::Result<bool> {
    let f = match std::fs::File::open(db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("open {} to see whether etcd holds it", db.display())),
    };
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("lock {}", db.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137, "SIGKILL");
    }

    #[test]
    fn a_locked_bbolt_file_is_seen_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("member/snap/db");
        assert!(!is_locked(&db).unwrap());
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        std::fs::write(&db, b"").unwrap();
        assert!(!is_locked(&db).unwrap());
        let holder = std::fs::File::open(&db).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert!(is_locked(&db).unwrap());
        drop(holder);
        assert!(!is_locked(&db).unwrap());
    }

    #[tokio::test]
    async fn no_command_after_the_separator_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let config = GateConfig {
            gate_dir: dir.path().join("gate"),
            data_dir: dir.path().join("etcd"),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            command: vec![],
            start_held: false,
        };
        let err = format!("{:#}", run(config).await.unwrap_err());
        assert!(err.contains("no etcd command after `--`"), "{err}");
    }

    #[tokio::test]
    async fn an_invalid_command_at_start_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(COMMAND_FILE), b"{not json").unwrap();
        let config = GateConfig {
            gate_dir: dir.path().to_owned(),
            data_dir: dir.path().join("etcd"),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            command: vec!["true".into()],
            start_held: false,
        };
        let err = format!("{:#}", run(config).await.unwrap_err());
        assert!(err.contains("command.json") && err.contains("key must be a string"), "{err}");
    }

    #[tokio::test]
    async fn a_held_gate_starts_nothing_and_holds_through_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let gate_dir = dir.path().join("gate");
        std::fs::create_dir(&gate_dir).unwrap();
        super::super::protocol::write_command(
            &gate_dir,
            &GateCommand { generation: 3, owner: "r1".into(), hold: true, overrides: vec![] },
        )
        .unwrap();
        // A program that would leave a trace if it ran.
        let marker = dir.path().join("ran");
        let config = GateConfig {
            gate_dir: gate_dir.clone(),
            data_dir: dir.path().join("etcd"),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            command: vec!["touch".into(), marker.display().to_string()],
            start_held: false,
        };
        let gate = tokio::spawn(run(config));
        let control = super::super::GateControl::new(&gate_dir);
        let status = control.hold("r1", Duration::from_secs(5)).await.unwrap();
        assert_eq!((status.state, status.applied_generation, status.owner.as_str()), (GateState::Held, 3, "r1"));
        assert_eq!(control.command().unwrap().generation, 3, "holding again for its owner writes nothing");
        // Another restore takes the hold over (a failed one left it): a new generation, still held.
        let status = control.hold("r2", Duration::from_secs(5)).await.unwrap();
        assert_eq!((status.state, status.applied_generation, status.owner.as_str()), (GateState::Held, 4, "r2"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!marker.exists(), "etcd must not start while held");
        gate.abort();
    }

    #[tokio::test]
    async fn start_held_holds_a_member_never_started_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let gate_dir = dir.path().join("gate");
        let marker = dir.path().join("ran");
        let config = |start_held| GateConfig {
            gate_dir: gate_dir.clone(),
            data_dir: dir.path().join("etcd"),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            command: vec!["touch".into(), marker.display().to_string()],
            start_held,
        };
        let gate = tokio::spawn(run(config(true)));
        let control = super::super::GateControl::new(&gate_dir);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while control.status().ok().flatten().is_none_or(|s| s.state != GateState::Held) {
            assert!(tokio::time::Instant::now() < deadline, "no held status");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(control.command().unwrap().owner, "bootstrap");
        assert!(!marker.exists(), "etcd must not start before its restore");
        gate.abort();
        // Released (by a restore's end): a later start with the flag follows command.json, and runs etcd.
        control.release("r1", Duration::from_millis(1)).await.ok();
        let code = run(config(true)).await.unwrap();
        assert_eq!(code, 0);
        assert!(marker.exists(), "a released member starts etcd even with --start-held");
    }
}
