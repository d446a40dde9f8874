//! How long a backup may take: shared by backup jobs, restore drills and the settings' defaults, which is why
//! it lives apart from all three (none of them imports another for it).

use std::time::Duration;

/// No snapshot bytes for this long aborts a job, whatever progress messages say: data frames (local) or
/// requests for the next part (S3, plus the time one part takes at the upload cap) are what count.
pub const BYTE_STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// A DB size an agent reports above this is not believed when sizing the job's deadline (etcd's own hard
/// limit on `--quota-backend-bytes` is 8 GiB; this leaves room).
const MAX_BELIEVED_DB_SIZE: i64 = 64 << 30;
/// Every job gets at least this long, plus time for its DB size at `ASSUMED_RATE`.
const JOB_TIMEOUT_BASE: Duration = Duration::from_secs(600);
/// A pessimistic end-to-end rate for sizing job timeouts (bytes per second).
const ASSUMED_RATE: u64 = 4 * 1024 * 1024;

/// How long one job may take: generous for its DB size, so large clusters are not cut off.
pub fn job_timeout(db_size: i64, upload_limit_bps: u64) -> Duration {
    let rate = if upload_limit_bps > 0 { upload_limit_bps.min(ASSUMED_RATE) } else { ASSUMED_RATE };
    // The agent reports the size: bounded, so a lying agent cannot hold a job slot for years.
    let db_size = db_size.clamp(0, MAX_BELIEVED_DB_SIZE) as u64;
    JOB_TIMEOUT_BASE + Duration::from_secs(db_size / rate.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_timeout_grows_with_db_size() {
        assert_eq!(job_timeout(0, 0), JOB_TIMEOUT_BASE);
        assert!(job_timeout(8 << 30, 0) > job_timeout(1 << 30, 0));
        assert!(job_timeout(1 << 30, 1 << 20) > job_timeout(1 << 30, 0), "a bandwidth cap needs more time");
    }
}
