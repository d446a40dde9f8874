//! The coordinator's settings, as the flags gave them, that jobs and the API need.

use std::time::Duration;

/// Coordinator settings that jobs need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// zstd level agents compress with.
    pub zstd_level: i32,
    /// S3 multipart part size in bytes.
    pub part_size: u64,
    /// S3 parts uploading at once per job.
    pub parts_in_flight: u32,
    /// Upload cap per job in bytes per second; 0 = unlimited.
    pub upload_limit_bps: u64,
    /// Download cap per job in bytes per second; 0 = unlimited.
    pub download_limit_bps: u64,
    /// Limits and jitter of automatic backups.
    pub bounds: Bounds,
    /// Backups running at once across clusters.
    pub max_concurrent_backups: usize,
    /// A job that moves no snapshot bytes for this long fails, whatever progress messages say.
    pub byte_stall_timeout: std::time::Duration,
    /// `--identity`: age identities the coordinator opens encrypted backups with for restores; never sent.
    pub identities: Option<ferry_common::encryption::Identities>,
    /// When a restore drill warns about lost keys (`--drill-key-drop-percent`, `--drill-key-drop-min-keys`).
    pub drill_key_drop: crate::drill::compare::KeyDrop,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            zstd_level: 1,
            part_size: 5 << 20,
            parts_in_flight: 3,
            upload_limit_bps: 0,
            download_limit_bps: 0,
            bounds: Bounds::default(),
            max_concurrent_backups: 8,
            byte_stall_timeout: crate::limits::BYTE_STALL_TIMEOUT,
            identities: None,
            drill_key_drop: Default::default(),
        }
    }
}

/// The coordinator's limits on automatic backups.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub min_interval: Duration,
    pub max_interval: Duration,
    /// Jitter as a fraction of the interval (0.05 = ±5 %).
    pub jitter_fraction: f64,
    /// Upper bound on the jitter, whatever the interval.
    pub max_jitter: Duration,
    /// The shortest restore drill interval a cluster may ask for (a drill reads and restores a whole backup).
    pub min_drill_interval: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(3600),
            max_interval: Duration::from_secs(24 * 3600),
            jitter_fraction: 0.05,
            max_jitter: Duration::from_secs(300),
            min_drill_interval: Duration::from_secs(3600),
        }
    }
}
