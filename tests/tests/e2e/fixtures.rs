//! The end-to-end harness: real `etcd` members, the real Ferry binaries, and the helpers the tests share.
//!
//! Every fixture owns a temp dir holding its data and its log files, picks its own loopback ports and kills
//! its child processes on drop, so tests can run in parallel threads of one process without seeing each
//! other. Set `FERRY_KEEP_TEST_DIRS=1` to keep the temp dirs (and their logs) after a run.
//!
//! - [`ports`]: free loopback ports.
//! - [`process`]: a spawned daemon with a log file, stopped on drop.
//! - [`etcd`]: [`EtcdCluster`] and the deterministic test data.
//! - [`ferry`]: [`Coordinator`], [`Agent`], [`Ferryctl`] and the one-shot `ferry-agent restore`.
//! - [`h2_corrupter`]: a proxy before etcd's client port that flips one bit inside a snapshot message.
//! - [`hostile`]: a hostile agent speaking the wire protocol with a real agent certificate.
//! - [`logs`]: checks on daemon logs.
//! - [`ministack`]: [`ministack::Ministack`], a real S3 server that refuses a part whose body does not match
//!   its signed checksums (s3s-fs does not).
//! - [`restore`]: restore a snapshot with `etcdctl` and read it back; decompress with `zstd`.
//! - [`s3`]: [`S3Server`] (a real `s3s-fs`), its Ferry config, and the `aws` CLI as an independent client.
//! - [`s3_faults`]: [`s3_faults::FaultProxy`], a slow, flaky or dead S3 endpoint in front of `s3s-fs`.
//! - [`tls_proxy`]: [`tls_proxy::TlsProxy`], HTTPS with a private CA in front of a plain-HTTP server.
//! - [`tools`]: where etcd 3.5 and the other programs come from; the check that the daemons are fresh.
//! - [`udp_relay`]: a UDP relay before the coordinator's QUIC port that can cut the path both ways.

// The fixture API is wider than what today's tests call (e.g. `stop_member`); less used items are reached
// through their module (`fixtures::ferry::BackupStore`).
#![allow(dead_code)]

pub(crate) mod etcd;
pub(crate) mod ferry;
pub(crate) mod h2_corrupter;
pub(crate) mod hostile;
pub(crate) mod logs;
pub(crate) mod ministack;
pub(crate) mod pki;
pub(crate) mod ports;
pub(crate) mod process;
pub(crate) mod restore;
pub(crate) mod s3;
pub(crate) mod s3_faults;
pub(crate) mod tls_proxy;
pub(crate) mod tools;
pub(crate) mod udp_relay;

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

pub(crate) use etcd::{expected_test_kvs, EtcdCluster, TEST_PREFIX};
pub(crate) use ferry::{
    manual_backup_yaml, unix_now, Agent, Coordinator, CoordinatorOptions, CtlOutput, Stop, STATUS_OK,
};
pub(crate) use logs::assert_no_unexpected_errors;
pub(crate) use restore::{restore_and_read, restore_and_read_raw, zstd_decompress};
pub(crate) use s3::{S3Server, TEST_BUCKET};

/// Generous upper bound for a daemon to come up and answer.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh temp dir named after what it holds; kept after the run when `FERRY_KEEP_TEST_DIRS` is set.
pub(crate) fn test_dir(what: &str) -> anyhow::Result<TempDir> {
    let keep = std::env::var_os("FERRY_KEEP_TEST_DIRS").is_some();
    let dir = tempfile::Builder::new().prefix(&format!("ferry-e2e-{what}-")).disable_cleanup(keep).tempdir()?;
    if keep {
        eprintln!("keeping test dir {}", dir.path().display());
    }
    Ok(dir)
}

/// Compares two key/value maps and panics with a short, readable summary (not a 3000-entry dump). Values
/// are `String`s or, for random data, `Vec<u8>`s.
#[track_caller]
pub(crate) fn assert_same_kvs<V: PartialEq>(
    expected: &std::collections::HashMap<String, V>,
    actual: &std::collections::HashMap<String, V>,
    what: &str,
) {
    let mut missing: Vec<&String> = expected.keys().filter(|k| !actual.contains_key(*k)).collect();
    let mut extra: Vec<&String> = actual.keys().filter(|k| !expected.contains_key(*k)).collect();
    let mut different: Vec<&String> =
        expected.iter().filter(|(k, v)| actual.get(*k).is_some_and(|a| a != *v)).map(|(k, _)| k).collect();
    if missing.is_empty() && extra.is_empty() && different.is_empty() {
        return;
    }
    missing.sort();
    extra.sort();
    different.sort();
    panic!(
        "{what}: expected {} keys, got {}; {} missing (first: {:?}), {} unexpected (first: {:?}), \
         {} with a different value (first: {:?})",
        expected.len(),
        actual.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>(),
        different.len(),
        different.iter().take(5).collect::<Vec<_>>(),
    );
}

/// Polls `probe` every `interval` until it yields `Some`, or fails after `timeout` with `what` and the last
/// error the probe reported. A [`process::Exited`] error (the daemon being waited for died) fails at once.
pub(crate) async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = String::from("(no error; condition not met)");
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) if e.is::<process::Exited>() => return Err(e.context(format!("waiting for {what}"))),
            Err(e) => last_error = format!("{e:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last: {last_error}");
        }
        tokio::time::sleep(interval).await;
    }
}

/// Every file under `dir`, recursively.
pub(crate) fn files_under(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(files_under(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// The size of a file, for messages and assertions.
pub(crate) fn file_len(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)?.len())
}

/// No unexpected ERROR lines in the coordinator's log nor in any agent's.
pub(crate) fn assert_daemon_logs_clean(coordinator: &Coordinator, agents: &[Agent]) {
    assert_no_unexpected_errors(coordinator.log_path(), &[]);
    for agent in agents {
        assert_no_unexpected_errors(agent.log_path(), &[]);
    }
}
