//! ferry-coordinator and ferryctl: the central server that holds configuration and status and commands
//! agents, and its resource-oriented CLI.

pub mod api;
pub mod backup;
pub mod coordinator;
pub mod ctl;
pub mod local_store;
pub mod metrics;
pub mod pki;
pub mod retention;
pub mod s3_store;
pub mod schedule;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod store;
pub mod template;
