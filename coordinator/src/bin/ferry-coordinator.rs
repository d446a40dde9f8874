//! `ferry-coordinator`: parses flags, opens the state dir and wires the QUIC server to the stores.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use ferry_common::observe::{init_logging, listen, shutdown_signal, LogFormat, Observed};
use ferry_common::resources::{Resource, ResourceType, Spec, S3_CONFIG_ID};
use ferry_common::tls::quinn_server_config;
use ferry_coordinator::coordinator::{Coordinator, Settings};
use ferry_coordinator::local_store::LocalStore;
use ferry_coordinator::s3_store::{S3Conn, S3Store};
use ferry_coordinator::schedule::Bounds;
use ferry_coordinator::state::RedbStore;
use ferry_coordinator::store::BackupStore;
use tracing::{info, warn};

/// How long running backups get to finish after SIGTERM before they are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Local,
    S3,
}

/// Ferry coordinator: holds configuration and status, and commands the agents.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the state store, the CA and admin.ferryconfig.
    #[arg(long)]
    state_dir: PathBuf,
    /// QUIC (UDP) address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// TCP address for /metrics, /healthz and /readyz (off when not given).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr; the level comes from RUST_LOG.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Where backups are stored.
    #[arg(long, value_enum, default_value = "local")]
    backup_store: StoreKind,
    /// Directory of the local store [default: STATE_DIR/backups].
    #[arg(long)]
    local_store_dir: Option<PathBuf>,
    /// Extra DNS name or IP for the server certificate (repeatable); the first is written into admin.ferryconfig
    /// when listening on all addresses.
    #[arg(long = "advertise-name")]
    advertise_names: Vec<String>,
    /// zstd level agents compress snapshots with (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// S3 multipart part size in MiB (S3 needs at least 5).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(5..=5120))]
    upload_part_size_mib: u64,
    /// S3 parts an agent uploads at once; agent memory is about part size × (this + 1).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    upload_parts_in_flight: u32,
    /// Upload bandwidth cap per backup in megabits per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    upload_limit_mbps: u64,
    /// Download bandwidth cap per restore in megabits per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    download_limit_mbps: u64,
    /// Shortest backup interval a cluster may ask for.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    min_backup_interval: Duration,
    /// Longest backup interval a cluster may ask for.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_backup_interval: Duration,
    /// Random offset of each scheduled backup, in percent of its interval (spreads clusters out).
    #[arg(long, default_value_t = 5.0)]
    backup_jitter_percent: f64,
    /// Upper bound of that offset.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    max_backup_jitter: Duration,
    /// Backups running at once across clusters; the rest queue in due order.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_concurrent_backups: u32,
}

/// Megabits per second to bytes per second.
fn mbps(m: u64) -> u64 {
    m.saturating_mul(1_000_000 / 8)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging(args.log_format);
    if let Err(e) = run(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("create --state-dir {}", args.state_dir.display()))?;
    let state = RedbStore::open(&args.state_dir.join("state.redb"))
        .context("open the state store (is another coordinator using this --state-dir?)")?;
    let pki = ferry_coordinator::pki::init(&args.state_dir, args.listen, &args.advertise_names)?;
    let store_dir = args.local_store_dir.clone().unwrap_or_else(|| args.state_dir.join("backups"));
    let store = match args.backup_store {
        StoreKind::Local => BackupStore::Local(LocalStore::open(&store_dir)?),
        StoreKind::S3 => {
            if args.local_store_dir.is_some() {
                bail!("--local-store-dir goes with --backup-store local");
            }
            BackupStore::S3(S3Store::default())
        }
    };
    let server_config = quinn_server_config(&pki.ca.pem().cert_pem, &pki.server)?;
    let settings = Settings {
        zstd_level: args.zstd_level,
        part_size: args.upload_part_size_mib * 1024 * 1024,
        parts_in_flight: args.upload_parts_in_flight,
        upload_limit_bps: mbps(args.upload_limit_mbps),
        download_limit_bps: mbps(args.download_limit_mbps),
        bounds: Bounds {
            min_interval: args.min_backup_interval,
            max_interval: args.max_backup_interval,
            jitter_fraction: args.backup_jitter_percent / 100.0,
            max_jitter: args.max_backup_jitter,
        },
        max_concurrent_backups: args.max_concurrent_backups as usize,
    };
    if args.min_backup_interval > args.max_backup_interval {
        bail!("--min-backup-interval is longer than --max-backup-interval");
    }
    if !(0.0..=50.0).contains(&args.backup_jitter_percent) {
        bail!("--backup-jitter-percent must be between 0 and 50");
    }
    let coord = Coordinator::new(Arc::new(state), store, pki.ca, settings)?;
    if matches!(coord.store, BackupStore::S3(_)) {
        load_s3_config(&coord).await?;
    }

    let endpoint_config = ferry_coordinator::pki::quic_endpoint_config(&args.state_dir)?;
    let socket = std::net::UdpSocket::bind(args.listen).with_context(|| format!("listen on {} (UDP)", args.listen))?;
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime))
        .with_context(|| format!("listen on {} (UDP)", args.listen))?;
    info!(listen = %args.listen, store = coord.store.name(), "coordinator ready");
    coord.listening.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(addr) = args.metrics_listen {
        let server = listen(addr, coord.clone() as Arc<dyn Observed>, coord.cancel.clone())
            .await
            .with_context(|| format!("listen on --metrics-listen {addr}"))?;
        coord.tasks.spawn(server);
    }
    let server = tokio::spawn(ferry_coordinator::server::serve(coord.clone(), endpoint.clone()));
    coord.tasks.spawn(ferry_coordinator::scheduler::run(coord.clone()));

    shutdown_signal().await;
    info!("shutting down: no new connections; waiting up to {}s for running backups", SHUTDOWN_GRACE.as_secs());
    coord.tasks.close();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        // Jobs end on their own; connection tasks of idle agents only end on cancel, so wait for jobs only.
        while coord.any_running() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if drained.is_err() {
        warn!("backups still running after the grace period; aborting them (partial objects are discarded)");
    }
    coord.cancel.cancel();
    let _ = server.await;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), coord.tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    info!("coordinator stopped");
    Ok(())
}

/// Uses the stored S3 config at once, and checks it in the background so a slow or down endpoint does not
/// hold up start-up; the check's outcome shows in `configurationerror`.
async fn load_s3_config(coord: &Arc<Coordinator>) -> Result<()> {
    let BackupStore::S3(store) = &coord.store else { return Ok(()) };
    let Some(Resource { spec: Spec::EtcdBackupS3Config(spec), .. }) =
        coord.state.get(ResourceType::EtcdBackupS3Config, S3_CONFIG_ID)?
    else {
        return Ok(());
    };
    let client = ferry_common::s3::client(&spec).await.context("build S3 client from the stored config")?;
    store.set(S3Conn { spec: spec.clone(), client });
    coord.set_configuration_status("", false)?;
    let c = coord.clone();
    coord.tasks.spawn(async move {
        if let Err(msg) = S3Store::validate(&spec).await {
            warn!("the stored S3 config does not work right now: {msg}");
            if let Err(e) = c.set_configuration_status(&msg, false) {
                warn!("failed to record configuration status: {e:#}");
            }
        }
    });
    // Aborts that failed while S3 was unreachable are retried until they succeed.
    let c = coord.clone();
    coord.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = c.cancel.cancelled() => return,
            }
            if let BackupStore::S3(s3) = &c.store {
                s3.retry_pending_aborts().await;
            }
        }
    });
    Ok(())
}
