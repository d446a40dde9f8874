//! `ferry-coordinator`: parses flags, opens the state dir, wires the owners together (state store, status,
//! agent registry, backup store, jobs, scheduler, API, listener) and shuts them down in order.
//!
//! With `--state-store etcd` several replicas share one state: each campaigns for leadership and, until it
//! leads, redirects every client to the leader. A term of leadership runs the owners exactly as a single
//! coordinator does after a start (so a new leader recovers from a dead one as a restarted coordinator
//! recovers from `kill -9`); a lost term ends like a shutdown without grace.

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
use ferry_common::tls::pem_serial_and_expiry;
use ferry_coordinator::agents::Agents;
use ferry_coordinator::api::{Api, ApiDeps};
use ferry_coordinator::backup::{JobDeps, Jobs};
use ferry_coordinator::config::{Bounds, Settings};
use ferry_coordinator::credentials::Credentials;
use ferry_coordinator::drill::compare::{KeyDrop, DEFAULT_DROP_PERCENT, DEFAULT_MIN_BASELINE_KEYS};
use ferry_coordinator::drill::{DrillDeps, Drills};
use ferry_coordinator::leader::{Election, Term};
use ferry_coordinator::metrics::{Metrics, Observer};
use ferry_coordinator::net::{redirect_to_leader, Server};
use ferry_coordinator::pki::{Authority, Keys};
use ferry_coordinator::schedule::{self, SchedulerDeps};
use ferry_coordinator::state::{EtcdStore, EtcdStoreOptions, RedbStore, StateStore};
use ferry_coordinator::status::Status;
use ferry_coordinator::store::{BackupStore, S3Conn, Verification, DEFAULT_MAX_SNAPSHOT_SIZE};
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
/// How often a state store that cannot write is probed (it recovers on the first probe that succeeds).
const STATE_PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often multipart-upload aborts that failed (S3 down) are retried.
const ABORT_RETRY_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StateKind {
    Redb,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Local,
    S3,
}

/// How an S3 upload is proven before its manifest is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VerifyUpload {
    /// Without downloading it: the stored parts are the announced ones (size, MD5, SHA-256), the completed
    /// object's size and multipart ETag are theirs, and its first bytes (≤ 1 %, a few KiB) are framed as
    /// asked (zstd, or age's header with the cluster's recipients); the drill proves it restores.
    Parts,
    /// Read back whole through every restore check (etcd's trailing hash, bbolt's meta page, the members):
    /// one more read of every backup from the bucket.
    Full,
}

impl From<VerifyUpload> for Verification {
    fn from(v: VerifyUpload) -> Self {
        match v {
            VerifyUpload::Parts => Self::Parts,
            VerifyUpload::Full => Self::Full,
        }
    }
}

/// Ferry coordinator: holds configuration and status, and commands the agents.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the state store, the CA and admin.ferryconfig (with --state-store etcd: admin.ferryconfig
    /// only; each replica has its own).
    #[arg(long)]
    state_dir: PathBuf,
    /// Where the state lives: an embedded redb file in --state-dir, or an etcd cluster that several replicas
    /// share (one leads, the others redirect clients to it).
    #[arg(long, value_enum, default_value = "redb")]
    state_store: StateKind,
    /// Client URLs of the state etcd, comma-separated (with --state-store etcd).
    #[arg(long, value_delimiter = ',')]
    state_etcd_endpoints: Vec<String>,
    /// Key prefix under which this coordinator set keeps its state in the state etcd.
    #[arg(long, default_value = "/ferry/")]
    state_etcd_prefix: String,
    /// CA certificate (PEM) of the state etcd's serving certificate.
    #[arg(long)]
    state_etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for the state etcd.
    #[arg(long)]
    state_etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for the state etcd.
    #[arg(long)]
    state_etcd_key: Option<PathBuf>,
    /// Client addresses (HOST:PORT) of every replica, comma-separated: written into admin.ferryconfig so
    /// ferryctl reaches whichever replica is up. This replica's own address when not given.
    #[arg(long, value_delimiter = ',')]
    replica_addresses: Vec<String>,
    /// QUIC (UDP) address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// TCP address for /metrics, /healthz and /readyz (off when not given).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TCP address for /healthz, /readyz and /leaderz alone, with connection caps of their own: what the
    /// kubelet's probes should use, so that a flood of the metrics port cannot fail them (off when not given).
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Log format on stderr; the level comes from RUST_LOG.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Where backups are stored.
    #[arg(long, value_enum, default_value = "local")]
    backup_store: StoreKind,
    /// How the coordinator proves an S3 upload before it lists it: `parts` reads no more than a few KiB of it,
    /// `full` reads it back whole (the local store checks every byte it receives either way).
    #[arg(long, value_enum, default_value = "parts")]
    verify_upload: VerifyUpload,
    /// Directory of the local store [default: STATE_DIR/backups].
    #[arg(long)]
    local_store_dir: Option<PathBuf>,
    /// Extra DNS name or IP for the server certificate (repeatable); the first is written into admin.ferryconfig
    /// when listening on all addresses.
    #[arg(long = "advertise-name")]
    advertise_names: Vec<String>,
    /// zstd level agents compress snapshots with (1-19). 1 costs the control-plane node about a third less
    /// CPU than 3 for objects a few per cent larger (docs/PERFORMANCE.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// S3 multipart part size in MiB (S3 needs at least 5; 5 keeps the agent's memory lowest, and 10 000 parts
    /// of it still hold a 48 GiB object).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(5..=5120))]
    upload_part_size_mib: u64,
    /// S3 parts an agent uploads at once; agent memory is about part size × (this + 1). Three keep a loopback
    /// or LAN S3 busy (docs/PERFORMANCE.md); raise it for a distant one.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
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
    /// Shortest restore drill interval a cluster may ask for (a drill reads, checks and restores its newest
    /// backup with etcd and etcdutl from PATH).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    min_drill_interval: Duration,
    /// Where restore drills restore (default STATE_DIR/drills). A drill needs about twice the backup's raw size
    /// plus 64 MiB there and checks that much is free before it starts; give it its own volume so a drill can
    /// never fill the state store's.
    #[arg(long)]
    drill_scratch_dir: Option<PathBuf>,
    /// A drill warns when a Kubernetes resource lost more than this percentage of its keys since the previous
    /// drill (0–100: 0 warns on any loss, 100 never).
    #[arg(long, default_value_t = u64::from(DEFAULT_DROP_PERCENT))]
    drill_key_drop_percent: u64,
    /// Resources with fewer keys than this in the previous drill are not judged by the key-drop warning
    /// (at least 1).
    #[arg(long, default_value_t = DEFAULT_MIN_BASELINE_KEYS)]
    drill_key_drop_min_keys: u64,
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
    /// Largest etcd snapshot taken, in MiB decompressed: bytes arriving beyond it are refused as they stream
    /// in, so an endless stream or a decompression bomb from a hostile agent stops there. The default, 16 GiB,
    /// is twice etcd's largest recommended `--quota-backend-bytes`.
    #[arg(long, default_value_t = DEFAULT_MAX_SNAPSHOT_SIZE >> 20, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    max_snapshot_size_mib: u64,
    /// A backup that moves no snapshot bytes for this long fails, whatever progress its agent reports.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration, hide = true)]
    byte_stall_timeout: Duration,
    /// This deployment's id, written into every manifest; retention deletes only backups carrying it, so
    /// deployments sharing a bucket never delete each other's [default: derived from the coordinator's CA].
    #[arg(long, value_parser = parse_deployment_id)]
    deployment_id: Option<String>,
    /// An age identity file (0600; `ferryctl encryption keygen`): the coordinator then opens encrypted backups
    /// itself for restores and streams the zstd inside to the restoring agent, which never gets the identity.
    /// Without it, restores of encrypted backups need `ferry-agent restore --identity`.
    #[arg(long)]
    identity: Option<PathBuf>,
}

fn parse_deployment_id(s: &str) -> Result<String, String> {
    ferry_common::resources::validate_name("deployment id", s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// The default deployment id: coordinators of one deployment share its CA (agents trust exactly one), so a
/// hash of the CA certificate names the deployment without any setting.
fn deployment_id_from_ca(ca_pem: &str) -> String {
    use sha2::Digest;
    format!("ca-{}", &hex::encode(sha2::Sha256::digest(ca_pem.as_bytes()))[..16])
}

/// Megabits per second to bytes per second.
fn mbps(m: u64) -> u64 {
    m.saturating_mul(1_000_000 / 8)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging(args.log_format);
    // The metrics port takes at most a fixed handful of descriptors; everything else is the daemon's work.
    match ferry_common::observe::raise_fd_limit() {
        Ok(n) => tracing::debug!(open_files = n, "file descriptor limit"),
        Err(e) => tracing::warn!("failed to raise the open-file limit: {e}"),
    }
    if let Err(e) = run(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // Flags first: a refused flag leaves nothing behind.
    let key_drop = KeyDrop::new(args.drill_key_drop_percent, args.drill_key_drop_min_keys)?;
    // The state dir holds the CA key, the admin credentials and the S3 secret: 0700, and every file in it
    // 0600, whatever the umask and whoever made the dir.
    create_private_dir(&args.state_dir)
        .with_context(|| format!("create --state-dir {} (0700)", args.state_dir.display()))?;
    // The etcd store again, typed: each term of leadership fences its writes.
    let mut fenced: Option<Arc<EtcdStore>> = None;
    let (state, election): (Arc<dyn StateStore>, Option<Election>) = match args.state_store {
        StateKind::Redb => {
            if !args.state_etcd_endpoints.is_empty() {
                bail!("--state-etcd-endpoints goes with --state-store etcd");
            }
            (Arc::new(open_redb(&args.state_dir)?), None)
        }
        StateKind::Etcd => {
            let options = etcd_options(&args)?;
            let me = ferry_coordinator::pki::client_address(args.listen, &args.advertise_names);
            let election = Election::connect(&options, me).await.context("connect to the state etcd")?;
            let endpoints = options.endpoints.join(",");
            let store = tokio::task::spawn_blocking(move || EtcdStore::connect(&options))
                .await
                .context("connect to the state etcd")?
                .with_context(|| format!("connect to the state etcd at {endpoints}"))?;
            let store = Arc::new(store);
            fenced = Some(store.clone());
            (store, Some(election))
        }
    };
    let keys = match election {
        Some(_) => Keys::Shared(state.clone()),
        None => Keys::Dir(args.state_dir.clone()),
    };
    let authority = Authority::load(keys.clone(), args.listen, &args.advertise_names)?;
    ferry_coordinator::pki::init(
        &authority,
        &args.state_dir,
        args.listen,
        &args.advertise_names,
        &args.replica_addresses,
    )?;
    let metrics = Arc::new(Metrics::default());
    set_ca_expiry(&metrics, &authority);
    // Before any election: with replicas, whichever leads must accept every replica's admin.ferryconfig.
    let own_credentials = Credentials::new(state.clone(), authority.clone(), metrics.clone());
    ferry_coordinator::pki::ensure_own_admin(&authority, &args.state_dir, &own_credentials)
        .context("check the coordinator's admin.ferryconfig")?;
    let store_dir = args.local_store_dir.clone().unwrap_or_else(|| args.state_dir.join("backups"));
    let deployment = match &args.deployment_id {
        Some(id) => id.clone(),
        // Named after the first CA and kept: a CA rotation must not move the backups' prefix.
        None => {
            let ca = authority.get().current.pem().cert_pem.clone();
            let id = state.blob_or_create("deployment-id", &mut || Ok(deployment_id_from_ca(&ca).into_bytes()))?;
            String::from_utf8(id).context("the deployment id in the state store is not UTF-8")?
        }
    };
    let store = Arc::new(
        match args.backup_store {
            StoreKind::Local => {
                if election.is_some() {
                    warn!("--backup-store local with --state-store etcd: each replica has its own backups; replicas should share an S3 store");
                }
                BackupStore::local(&store_dir).context("open the local store")?
            }
            StoreKind::S3 => {
                if args.local_store_dir.is_some() {
                    bail!("--local-store-dir goes with --backup-store local");
                }
                BackupStore::s3()
            }
        }
        .with_deployment(deployment.clone())
        .with_max_snapshot_size(args.max_snapshot_size_mib << 20)
        .with_verification(args.verify_upload.into(), metrics.store_verify_read.clone())
        .with_state(state.clone()),
    );
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
            min_drill_interval: args.min_drill_interval,
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
        drill_key_drop: key_drop,
    };

    let endpoint_config = ferry_coordinator::pki::quic_endpoint_config(&keys)?;
    let socket = std::net::UdpSocket::bind(args.listen).with_context(|| format!("listen on {} (UDP)", args.listen))?;
    let endpoint =
        quinn::Endpoint::new(endpoint_config, Some(authority.server_config()?), socket, Arc::new(quinn::TokioRuntime))
            .with_context(|| format!("listen on {} (UDP)", args.listen))?;
    info!(listen = %args.listen, store = store.name(), state = ?args.state_store, %deployment, "coordinator ready");
    let process = CancellationToken::new();
    let process_tasks = TaskTracker::new();
    let observer = Arc::new(Observer { metrics: metrics.clone(), listening: true.into(), state: state.clone() });
    // A state store that cannot write (disk full) recovers by itself once the cause is gone: probe it, and
    // keep its metric current, even when nobody scrapes.
    let (st, m, c) = (state.clone(), metrics.clone(), process.clone());
    process_tasks.spawn(async move {
        loop {
            m.state_store_writable.set(i64::from(tokio::task::block_in_place(|| st.health()).is_ok()));
            tokio::select! {
                () = tokio::time::sleep(STATE_PROBE_EVERY) => {}
                () = c.cancelled() => return,
            }
        }
    });
    process_tasks.spawn(follow_the_cas(
        authority.clone(),
        matches!(keys, Keys::Shared(_)),
        endpoint.clone(),
        metrics.clone(),
        (args.state_dir.clone(), own_credentials),
        process.clone(),
    ));
    if let Some(addr) = args.health_listen {
        let serve = ferry_common::observe::listen_health(addr, observer.clone() as Arc<dyn Observed>, process.clone())
            .await
            .with_context(|| format!("listen on --health-listen {addr}"))?;
        process_tasks.spawn(serve);
    }
    if let Some(addr) = args.metrics_listen {
        let serve = listen(addr, observer as Arc<dyn Observed>, process.clone())
            .await
            .with_context(|| format!("listen on --metrics-listen {addr}"))?;
        process_tasks.spawn(serve);
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });

    let shared = Shared {
        args: &args,
        state,
        store,
        settings,
        metrics: metrics.clone(),
        authority: authority.clone(),
        endpoint: endpoint.clone(),
    };
    loop {
        let term = match &election {
            None => None,
            Some(election) => {
                // Until elected, every client is sent to the leader.
                let stop_redirecting = CancellationToken::new();
                let credentials =
                    Credentials::new(shared.state.clone(), shared.authority.clone(), shared.metrics.clone());
                let redirect = tokio::spawn(redirect_to_leader(
                    endpoint.clone(),
                    election.clone(),
                    credentials,
                    stop_redirecting.clone(),
                ));
                info!("campaigning for leadership; redirecting clients to the leader meanwhile");
                let term = election.campaign(&shutdown).await;
                stop_redirecting.cancel();
                let _ = redirect.await;
                match term {
                    Some(term) => {
                        if let Some(store) = &fenced {
                            store.fence(term.fence.0.clone(), term.fence.1);
                        }
                        Some(term)
                    }
                    None => break,
                }
            }
        };
        let lost = term.as_ref().map_or_else(CancellationToken::new, |t: &Term| t.lost.clone());
        // Another replica may have rotated the CAs since they were last read.
        if term.is_some() {
            if let Err(e) = tokio::task::block_in_place(|| shared.authority.reload()) {
                warn!("failed to read the CAs from the state store: {e:#}");
            }
        }
        endpoint.set_server_config(Some(shared.authority.server_config()?));
        metrics.leader.set(1);
        let ended = lead(&shared, &lost, &shutdown).await;
        metrics.leader.set(0);
        let Some(term) = term else {
            ended?;
            break;
        };
        // Handing over at once rather than when the lease runs out.
        term.resign().await;
        if let Err(e) = ended {
            warn!("failed to lead: {e:#}");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => {}
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        endpoint.set_server_config(Some(shared.authority.server_config()?));
    }
    process.cancel();
    process_tasks.close();
    let _ = tokio::time::timeout(CLOSE_DEADLINE, process_tasks.wait()).await;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    info!("coordinator stopped");
    Ok(())
}

/// What every term of leadership works with.
struct Shared<'a> {
    args: &'a Args,
    state: Arc<dyn StateStore>,
    store: Arc<BackupStore>,
    settings: Settings,
    metrics: Arc<Metrics>,
    authority: Arc<Authority>,
    endpoint: quinn::Endpoint,
}

/// How often replicas read the shared CAs again (another replica may have rotated them).
const CA_POLL: Duration = Duration::from_secs(5);

/// Keeps what depends on the CAs in force current: the server config new connections get, the CA expiry
/// metric and this coordinator's own `admin.ferryconfig`. Replicas also poll the shared CAs.
async fn follow_the_cas(
    authority: Arc<Authority>,
    shared: bool,
    endpoint: quinn::Endpoint,
    metrics: Arc<Metrics>,
    (state_dir, own_credentials): (std::path::PathBuf, Credentials),
    cancel: CancellationToken,
) {
    let mut changed = authority.subscribe();
    let mut poll = tokio::time::interval(CA_POLL);
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = poll.tick(), if shared => {
                if let Err(e) = tokio::task::block_in_place(|| authority.reload()) {
                    warn!("failed to read the CAs from the state store: {e:#}");
                }
                continue;
            }
            () = cancel.cancelled() => return,
        }
        match authority.server_config() {
            Ok(config) => endpoint.set_server_config(Some(config)),
            Err(e) => warn!("failed to make the server config for the CAs in force: {e:#}"),
        }
        set_ca_expiry(&metrics, &authority);
        // A follower cannot write (its records are fenced): it rewrites the file when it next leads or starts.
        if let Err(e) = tokio::task::block_in_place(|| {
            ferry_coordinator::pki::ensure_own_admin(&authority, &state_dir, &own_credentials)
        }) {
            warn!("failed to rewrite admin.ferryconfig for the CAs in force: {e:#}");
        }
        info!("the CAs in force changed: new connections are served with them");
    }
}

fn set_ca_expiry(metrics: &Metrics, authority: &Authority) {
    match pem_serial_and_expiry(&authority.get().current.pem().cert_pem) {
        Ok((_, not_after)) => {
            let seconds = not_after.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            metrics.ca_certificate_expiry.set(seconds);
        }
        Err(e) => warn!("failed to read the CA certificate's expiry: {e}"),
    }
}

/// Opens the embedded state store in the state dir.
fn open_redb(state_dir: &std::path::Path) -> Result<RedbStore> {
    let db_path = state_dir.join("state.redb");
    match create_private(&db_path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(&db_path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("make {} private (0600)", db_path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("create {}", db_path.display())),
    }
    RedbStore::open(&db_path).context("open the state store (is another coordinator using this --state-dir?)")
}

/// The state etcd settings, checked.
fn etcd_options(args: &Args) -> Result<EtcdStoreOptions> {
    if args.state_etcd_endpoints.is_empty() {
        bail!("--state-store etcd needs --state-etcd-endpoints URL[,URL…]");
    }
    for url in &args.state_etcd_endpoints {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--state-etcd-endpoints: {url:?} is not an http:// or https:// URL");
        }
    }
    if !args.state_etcd_prefix.starts_with('/') || !args.state_etcd_prefix.ends_with('/') {
        bail!("--state-etcd-prefix must start and end with '/' (e.g. /ferry/), got {:?}", args.state_etcd_prefix);
    }
    Ok(EtcdStoreOptions {
        endpoints: args.state_etcd_endpoints.clone(),
        prefix: args.state_etcd_prefix.clone(),
        cacert: args.state_etcd_cacert.clone(),
        cert: args.state_etcd_cert.clone(),
        key: args.state_etcd_key.clone(),
    })
}

/// One term of leadership (for a single coordinator, its whole life): the owners start as after a restart and
/// run until `shutdown` (ordered, with the grace period) or until `lost` (at once: running backups are
/// cancelled, their uploads aborted, and every connection closes so clients go to the new leader).
async fn lead(shared: &Shared<'_>, lost: &CancellationToken, shutdown: &CancellationToken) -> Result<()> {
    let Shared { args, state, store, settings, metrics, authority, endpoint } = shared;
    let (state, store, settings, metrics) = (state.clone(), store.clone(), settings.clone(), metrics.clone());
    // The owners, each with its own handle.
    let status = Status::new(state.clone(), metrics.clone(), store.name(), store.initial_configuration_error())
        .context("initialize status")?;
    let agents = Agents::new(state.clone(), metrics.clone()).context("initialize agents")?;
    let credentials = Credentials::new(state.clone(), authority.clone(), metrics.clone());
    // A follower could not record a new admin.ferryconfig when the CAs changed (its writes are fenced).
    if let Err(e) = ferry_coordinator::pki::ensure_own_admin(authority, &args.state_dir, &credentials) {
        warn!("failed to rewrite admin.ferryconfig for the CAs in force: {e:#}");
    }
    if let Err(e) = credentials.seed_metrics() {
        warn!("failed to read the certificates' records for their expiry metrics: {e}");
    }

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
    let changelog = ferry_coordinator::changelog::ChangeLog::new(ferry_coordinator::changelog::ChangeLogDeps {
        state: state.clone(),
        agents: agents.clone(),
        store: store.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        jobs: jobs.clone(),
        identities: settings.identities.clone(),
        settings: Default::default(),
        scratch: args.drill_scratch_dir.clone().unwrap_or_else(|| args.state_dir.join("drills")),
    });
    let stop_changelog = CancellationToken::new();
    let changelog_task = tokio::spawn(changelog.clone().run(stop_changelog.clone()));
    let api = Arc::new(Api::new(ApiDeps {
        state: state.clone(),
        store: store.clone(),
        status: status.clone(),
        agents: agents.clone(),
        jobs: jobs.clone(),
        credentials: credentials.clone(),
        settings: settings.clone(),
        changelog,
        cancel: background.clone(),
    }));
    let stop_restores = CancellationToken::new();
    let restores = tokio::spawn(ferry_coordinator::restore::run(
        ferry_coordinator::restore::RestoreDeps {
            state: state.clone(),
            agents: agents.clone(),
            api: api.clone(),
            jobs: jobs.clone(),
            metrics: metrics.clone(),
        },
        stop_restores.clone(),
    ));
    let server = Server::new(api, agents.clone(), credentials);
    let (stop_accepting, stop_serving) = (CancellationToken::new(), CancellationToken::new());
    let listener = tokio::spawn(server.clone().serve(endpoint.clone(), stop_accepting.clone(), stop_serving.clone()));
    let drills = Drills::new(DrillDeps {
        store: store.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        scratch: args.drill_scratch_dir.clone().unwrap_or_else(|| args.state_dir.join("drills")),
        identities: settings.identities.clone(),
        key_drop: settings.drill_key_drop,
        agents: agents.clone(),
    })?;
    let stop_scheduler = CancellationToken::new();
    let scheduler = schedule::spawn(
        SchedulerDeps {
            state,
            store,
            agents,
            jobs: jobs.clone(),
            metrics,
            bounds: settings.bounds.clone(),
            drills: drills.clone(),
        },
        outcomes_rx,
        stop_scheduler.clone(),
    );

    tokio::select! {
        () = shutdown.cancelled() => {}
        () = lost.cancelled() => {}
    }
    let grace = if shutdown.is_cancelled() { args.shutdown_grace } else { Duration::ZERO };
    if lost.is_cancelled() && !shutdown.is_cancelled() {
        warn!("no longer the leader: stopping backups and the scheduler; clients go to the new leader");
    }
    // 1. Nothing new: new connections are refused with a reason, the scheduler stops, no job starts (queued ones
    //    give up, manual applies on connections already open are refused).
    info!(grace_s = grace.as_secs_f64(), "stopping: no new connections or backups; waiting for running backups");
    stop_accepting.cancel();
    stop_scheduler.cancel();
    jobs.stop_starting();
    let _ = scheduler.await;
    // A restore pauses between steps (each is idempotent); the next leader, or this one restarted, goes on.
    stop_restores.cancel();
    let _ = restores.await;
    // Watchers stop; the next leader (or this one restarted) goes on from the covered revision.
    stop_changelog.cancel();
    let _ = changelog_task.await;
    // A drill only reads: it is cancelled at once (its throw-away etcd is killed, its scratch dir removed).
    if !drills.stop(CANCEL_DEADLINE).await {
        warn!("the restore drill did not stop within {}s", CANCEL_DEADLINE.as_secs());
    }
    // 2. Running jobs get the grace period; 3. then they are cancelled and clean up.
    if !jobs.drain(grace).await {
        warn!("backups still running after the grace period; cancelling them (partial objects are discarded, uploads aborted)");
        if !jobs.cancel(CANCEL_DEADLINE).await {
            warn!("backup cleanup did not finish within {}s", CANCEL_DEADLINE.as_secs());
        }
    }
    // 4. Connections close, background work stops.
    background.cancel();
    server.close_connections(CLOSE_DEADLINE).await;
    stop_serving.cancel();
    let _ = listener.await;
    background_tasks.close();
    let _ = tokio::time::timeout(CLOSE_DEADLINE, background_tasks.wait()).await;
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
    let (s, st, c) = (store.clone(), status.clone(), cancel.clone());
    tasks.spawn(async move {
        if let Err(msg) = s.check_s3_config(&spec).await {
            warn!("the stored S3 config does not work right now: {msg}");
            if let Err(e) = st.set_configuration(&msg, false) {
                warn!("failed to record configuration status: {e:#}");
            }
            return;
        }
        // At the start of a term: uploads a dead leader (or this coordinator before a crash) left open.
        s.retry_pending_aborts(&c).await;
    });
    Ok(())
}
