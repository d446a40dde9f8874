//! `ferry-coordinator`: parses flags, opens the state dir, wires the owners together (state store, status,
//! agent registry, backup store, jobs, scheduler, API, listener) and shuts them down in order.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use ferry_common::config::{create_private, create_private_dir};
use ferry_common::encryption::Identities;
use ferry_common::observe::{init_logging, listen, shutdown_signal, LogFormat, Observed};
use ferry_common::resources::{Resource, ResourceType, Spec, S3_CONFIG_ID};
use ferry_common::tls::quinn_server_config;
use ferry_coordinator::agents::Agents;
use ferry_coordinator::api::{Api, ApiDeps};
use ferry_coordinator::backup::{JobDeps, Jobs};
use ferry_coordinator::config::{Bounds, Settings};
use ferry_coordinator::credentials::Credentials;
use ferry_coordinator::metrics::{Metrics, Observer};
use ferry_coordinator::net::Server;
use ferry_coordinator::schedule::{self, SchedulerDeps};
use ferry_coordinator::state::{RedbStore, StateStore};
use ferry_coordinator::status::Status;
use ferry_coordinator::store::{BackupStore, S3Conn};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long running backups get to finish after SIGTERM before they are cancelled (the default of
/// `--shutdown-grace`).
const SHUTDOWN_GRACE: &str = "30s";
/// After cancelling, how long jobs get to clean up (remove partial files, abort uploads).
const CANCEL_DEADLINE: Duration = Duration::from_secs(10);
/// How long open connections get to close.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// How often multipart-upload aborts that failed (S3 down) are retried.
const ABORT_RETRY_EVERY: Duration = Duration::from_secs(60);

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
    /// After SIGTERM, how long running backups get to finish before they are cancelled (no new backup starts
    /// meanwhile).
    #[arg(long, default_value = SHUTDOWN_GRACE, value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// A backup that moves no snapshot bytes for this long fails, whatever progress its agent reports.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration, hide = true)]
    byte_stall_timeout: Duration,
    /// An age identity file (0600; `ferryctl encryption keygen`): the coordinator then opens encrypted backups
    /// itself for restores and streams the zstd inside to the restoring agent, which never gets the identity.
    /// Without it, restores of encrypted backups need `ferry-agent restore --identity`.
    #[arg(long)]
    identity: Option<PathBuf>,
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
    // The state dir holds the CA key, the admin credentials and the S3 secret: 0700, and every file in it
    // 0600, whatever the umask and whoever made the dir.
    create_private_dir(&args.state_dir)
        .with_context(|| format!("create --state-dir {} (0700)", args.state_dir.display()))?;
    let db_path = args.state_dir.join("state.redb");
    match create_private(&db_path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(&db_path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("make {} private (0600)", db_path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("create {}", db_path.display())),
    }
    let state: Arc<dyn StateStore> = Arc::new(
        RedbStore::open(&db_path).context("open the state store (is another coordinator using this --state-dir?)")?,
    );
    let pki = ferry_coordinator::pki::init(&args.state_dir, args.listen, &args.advertise_names)?;
    let store_dir = args.local_store_dir.clone().unwrap_or_else(|| args.state_dir.join("backups"));
    let store = Arc::new(match args.backup_store {
        StoreKind::Local => BackupStore::local(&store_dir).context("open the local store")?,
        StoreKind::S3 => {
            if args.local_store_dir.is_some() {
                bail!("--local-store-dir goes with --backup-store local");
            }
            BackupStore::s3()
        }
    });
    let server_config = quinn_server_config(&pki.ca.pem().cert_pem, &pki.server)?;
    if args.min_backup_interval > args.max_backup_interval {
        bail!("--min-backup-interval is longer than --max-backup-interval");
    }
    if !(0.0..=50.0).contains(&args.backup_jitter_percent) {
        bail!("--backup-jitter-percent must be between 0 and 50");
    }
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
        byte_stall_timeout: args.byte_stall_timeout,
        identities: match &args.identity {
            Some(path) => {
                let ids = Identities::load(path)?;
                info!(recipients = ?ids.recipients(), "restores open encrypted backups with --identity");
                Some(ids)
            }
            None => None,
        },
    };

    // The owners, each with its own handle.
    let metrics = Arc::new(Metrics::default());
    let status = Status::new(state.clone(), metrics.clone(), store.name(), store.initial_configuration_error())
        .context("initialize status")?;
    let agents = Agents::new(state.clone(), metrics.clone()).context("initialize agents")?;
    let credentials = Credentials::new(state.clone());
    let (outcomes_tx, outcomes_rx) = tokio::sync::mpsc::unbounded_channel();
    let jobs = Jobs::new(
        JobDeps {
            agents: agents.clone(),
            store: store.clone(),
            status: status.clone(),
            state: state.clone(),
            metrics: metrics.clone(),
            settings: settings.clone(),
        },
        outcomes_tx,
    );
    // Background work of the store and the API (config checks, abort retries, request store calls).
    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    if store.takes_s3_config() {
        load_s3_config(&state, &store, &status, &background, &background_tasks).await?;
    }
    let api = Arc::new(Api::new(ApiDeps {
        state: state.clone(),
        store: store.clone(),
        status: status.clone(),
        agents: agents.clone(),
        jobs: jobs.clone(),
        ca: pki.ca,
        credentials: credentials.clone(),
        settings: settings.clone(),
        cancel: background.clone(),
    }));
    let server = Server::new(api, agents.clone(), credentials);

    let endpoint_config = ferry_coordinator::pki::quic_endpoint_config(&args.state_dir)?;
    let socket = std::net::UdpSocket::bind(args.listen).with_context(|| format!("listen on {} (UDP)", args.listen))?;
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime))
        .with_context(|| format!("listen on {} (UDP)", args.listen))?;
    info!(listen = %args.listen, store = store.name(), "coordinator ready");
    let observer = Arc::new(Observer { metrics: metrics.clone(), listening: true.into() });
    if let Some(addr) = args.metrics_listen {
        let serve = listen(addr, observer as Arc<dyn Observed>, background.clone())
            .await
            .with_context(|| format!("listen on --metrics-listen {addr}"))?;
        background_tasks.spawn(serve);
    }
    let stop_accepting = CancellationToken::new();
    let listener = tokio::spawn(server.clone().serve(endpoint.clone(), stop_accepting.clone()));
    let stop_scheduler = CancellationToken::new();
    let scheduler = schedule::spawn(
        SchedulerDeps { state, store, agents, jobs: jobs.clone(), metrics, bounds: settings.bounds.clone() },
        outcomes_rx,
        stop_scheduler.clone(),
    );

    shutdown_signal().await;
    // 1. Nothing new: the listener refuses connections, the scheduler stops, no job starts (queued ones give up,
    //    manual applies on connections already open are refused).
    info!(
        grace_s = args.shutdown_grace.as_secs_f64(),
        "shutting down: no new connections or backups; waiting for running backups"
    );
    stop_accepting.cancel();
    stop_scheduler.cancel();
    jobs.stop_starting();
    let _ = listener.await;
    let _ = scheduler.await;
    // 2. Running jobs get the grace period; 3. then they are cancelled and clean up.
    if !jobs.drain(args.shutdown_grace).await {
        warn!("backups still running after the grace period; cancelling them (partial objects are discarded, uploads aborted)");
        if !jobs.cancel(CANCEL_DEADLINE).await {
            warn!("backup cleanup did not finish within {}s", CANCEL_DEADLINE.as_secs());
        }
    }
    // 4. Connections close, background work stops.
    background.cancel();
    server.close_connections(CLOSE_DEADLINE).await;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    background_tasks.close();
    let _ = tokio::time::timeout(CLOSE_DEADLINE, background_tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    info!("coordinator stopped");
    Ok(())
}

/// Uses the stored S3 config at once, and checks it in the background so a slow or down endpoint does not
/// hold up start-up; the check's outcome shows in `configurationerror`.
async fn load_s3_config(
    state: &Arc<dyn StateStore>,
    store: &Arc<BackupStore>,
    status: &Status,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<()> {
    // Aborts that failed while S3 was unreachable are retried until they succeed.
    let (s, c) = (store.clone(), cancel.clone());
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(ABORT_RETRY_EVERY) => {}
                () = c.cancelled() => return,
            }
            s.retry_pending_aborts(&c).await;
        }
    });
    let Some(Resource { spec: Spec::EtcdBackupS3Config(spec), .. }) =
        state.get(ResourceType::EtcdBackupS3Config, S3_CONFIG_ID)?
    else {
        return Ok(());
    };
    let conn =
        S3Conn::unchecked(&spec).await.map_err(|e| anyhow::anyhow!("build S3 client from the stored config: {e}"))?;
    store.set_s3_config(conn);
    status.set_configuration("", false)?;
    let (s, st) = (store.clone(), status.clone());
    tasks.spawn(async move {
        if let Err(msg) = s.check_s3_config(&spec).await {
            warn!("the stored S3 config does not work right now: {msg}");
            if let Err(e) = st.set_configuration(&msg, false) {
                warn!("failed to record configuration status: {e:#}");
            }
        }
    });
    Ok(())
}
