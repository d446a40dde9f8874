//! End-to-end tests: real etcd members, the real `ferry-coordinator`, `ferry-agent` and `ferryctl`.
//!
//! Build the binaries first: `cargo build --workspace --bins && cargo test --workspace`.

mod fixtures;

mod backup;
mod ca_rotation;
mod changelog;
mod cli;
mod coverage;
mod credentials;
mod deploy;
mod drills;
mod encryption;
mod failures;
mod faults;
mod faults_net;
mod faults_s3;
mod gate;
mod ha;
mod harness;
mod least_privilege;
mod network;
mod observe;
mod persistence;
mod pointintime;
mod rejections;
mod restore;
mod restore_orchestrated;
mod s3;
mod s3_checksums;
mod s3_tls;
mod schedule;
mod security;
mod shutdown;
