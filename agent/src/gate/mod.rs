//! The gate: `ferry-agent gate -- etcd ARGS…` runs etcd as its child, so that the agent sidecar can stop
//! etcd and keep it stopped (a *hold*), or start it again with some flags overridden, through two files in a
//! directory both share (`--gate-dir`, a hostPath). The hold lives in a file, not in a process: a gate that
//! restarts (container restart, reboot) reads it before it starts anything, so a held member stays down.
//!
//! - [`protocol`]: the two files, `command.json` (the agent's) and `status.json` (the gate's), their atomic
//!   writes, and the flag rewriting that makes etcd's effective arguments.
//! - [`control`]: [`GateControl`], the agent's side: hold, start, release, status.
//! - [`process`]: the gate process itself.
//!
//! docs/ARCHITECTURE.md, "The gate", has the protocol and why a hold is durable.

pub mod control;
pub mod process;
pub mod protocol;

pub use control::GateControl;
pub use process::{data_dir_in_use, run, GateConfig, DEFAULT_STOP_TIMEOUT};
pub use protocol::{EtcdArgs, GateCommand, GateState, GateStatus, COMMAND_FILE, STATUS_FILE};
