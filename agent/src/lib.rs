//! ferry-agent: runs beside an etcd member, dials the coordinator and streams snapshots on command.

pub mod backoff;
pub mod etcd;
pub mod gate;
pub mod job;
pub mod link;
pub mod metrics;
pub mod pacing;
pub mod pipeline;
pub mod restore;
pub mod restore_steps;
pub mod scratch;
pub mod throttle;
pub mod upload;
pub mod watch;
