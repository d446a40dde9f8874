//! The contract between Ferry's daemons and its CLI: wire protocol, resource types, TLS and config
//! primitives. No daemon logic lives here.

pub mod backoff;
pub mod bbolt;
pub mod client;
pub mod config;
pub mod encryption;
pub mod observe;
pub mod presigned;
pub mod progress;
pub mod protocol;
pub mod resources;
pub mod s3;
pub mod segment;
pub mod snapshot;
pub mod tls;
