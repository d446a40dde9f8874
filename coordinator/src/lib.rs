//! ferry-coordinator and ferryctl: the central server that holds configuration and status and commands
//! agents, and its resource-oriented CLI.
//!
//! One owner per piece of state, each behind a narrow handle:
//! - [`state`]: resources, crash-safe (the `StateStore` trait: embedded redb, or a shared etcd);
//! - [`agents`]: the registry of live agents and the `Agents` resources;
//! - [`credentials`]: the agent certificates issued (`AgentCredentials`), revocation and who is connected with each;
//! - [`status`]: cluster and overall backup status, each update one state-store transaction;
//! - [`encryption`]: which recipients a cluster's backups are sealed to; opening them with `--identity`;
//! - [`store`]: the backup store (local or S3) behind one interface, a `Pending` object per job;
//! - [`backup`]: `Jobs`, which starts, runs and drains backup jobs and reports each outcome on a channel;
//! - [`schedule`]: the scheduler task, owner of its per-cluster state, fed by those outcomes;
//! - [`net`] and [`api`]: the QUIC listener and the admin requests it serves;
//! - [`leader`]: the election among replicas sharing a state etcd (only the leader runs the owners above);
//! - [`cli`]: ferryctl's half (tables, cluster templates);
//! - [`limits`]: how long a backup may take (jobs, drills and the settings' defaults share it).
//!
//! Imports point one way: `schedule` → `backup` → {`store`, `status`, `agents`} → `state`; nothing below imports
//! what is above it.

pub mod agents;
pub mod api;
pub mod backup;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod drill;
pub mod encryption;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod pki;
pub mod pointintime;
pub mod restore;
pub mod restore_check;
pub mod schedule;
pub mod state;
pub mod status;
pub mod store;

/// Locks a short-lived mutex. A panic while holding one of these leaves consistent data (each critical section
/// is one map operation), so poisoning is not a reason to stop serving.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
