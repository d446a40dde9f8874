//! `ferry-agent`: parses flags and wires the coordinator link to the etcd member.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ferry_agent::backoff::PacingSettings;
use ferry_agent::etcd::{EtcdMember, EtcdTls};
use ferry_agent::job::PipelineSettings;
use ferry_agent::link::Link;
use ferry_agent::restore::{BumpChoice, RestoreRequest};
use ferry_agent::scratch::ScratchChoice;
use std::sync::Arc;

use ferry_common::config::{AgentCredentials, FerryConfig};
use ferry_common::observe::{init_logging, listen, shutdown_signal, LogFormat};
use ferry_common::snapshot::RestoreAs;
use ferry_common::tls::Identity;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

/// Ferry agent: backs up the etcd member it runs beside, on the coordinator's command.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Rebuild this member's data dir from a backup (run as an init container, before etcd starts).
    Restore(RestoreArgs),
    /// Run etcd as this process's child, so that the agent can hold it stopped or restart it with other
    /// flags through files in --gate-dir (etcd's container command: `ferry-agent gate … -- etcd ARGS…`).
    Gate(GateArgs),
}

#[derive(clap::Args, Debug)]
struct GateArgs {
    /// Directory shared with the agent sidecar (a hostPath): command.json in, status.json out. Created 0700
    /// when missing.
    #[arg(long)]
    gate_dir: PathBuf,
    /// etcd's data dir: a hold is reported once etcd's lock on its member/snap/db is gone.
    #[arg(long)]
    data_dir: PathBuf,
    /// How long etcd gets to exit after SIGTERM before it is killed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stop_timeout: std::time::Duration,
    /// A member of a new cluster to be restored from another cluster's backup (a cluster template's
    /// `features.restoreFrom`): hold etcd from the very first start, until the coordinator restored it. Only
    /// while no command.json exists: later starts follow it.
    #[arg(long)]
    start_held: bool,
    /// etcd's command line, after `--`: `-- etcd --name=m1 …`.
    #[arg(last = true, value_name = "ETCD_COMMAND")]
    etcd: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// Coordinator QUIC address, HOST:PORT[,HOST:PORT…] (read from --ferryconfig when that is given).
    #[arg(long, env = "FERRY_COORDINATOR")]
    coordinator: Option<String>,
    /// Agent credentials (ca.crt, agent.crt, agent.key): restores this agent's own cluster.
    #[arg(long, env = "FERRY_CREDENTIALS", conflicts_with = "ferryconfig", required_unless_present = "ferryconfig")]
    credentials: Option<PathBuf>,
    /// An admin ferryconfig instead of agent credentials: may restore any cluster's backup (--from-cluster).
    #[arg(long)]
    ferryconfig: Option<PathBuf>,
    /// Cluster whose backup to restore (admin credentials only; seeds a new cluster from another's backup).
    #[arg(long, requires = "ferryconfig")]
    from_cluster: Option<String>,
    /// Backup id, or `latest`.
    #[arg(long)]
    backup: String,
    /// etcd data dir to create (e.g. /var/lib/etcd).
    #[arg(long)]
    data_dir: PathBuf,
    /// This member's name (etcd --name).
    #[arg(long)]
    name: String,
    /// The new cluster's members, NAME=PEER_URL,… (etcd --initial-cluster).
    #[arg(long)]
    initial_cluster: String,
    /// A token unique to the restored cluster (etcd --initial-cluster-token).
    #[arg(long)]
    initial_cluster_token: String,
    /// This member's peer URL (etcd --initial-advertise-peer-urls).
    #[arg(long)]
    initial_advertise_peer_urls: String,
    /// Restore even though the data dir has data; the old contents are moved aside, never deleted.
    #[arg(long)]
    force: bool,
    /// Raise the restored revision by exactly N (and mark it compacted) instead of the planned bump. Give
    /// every member of the cluster the same N.
    #[arg(long, value_name = "N", conflicts_with = "no_bump_revision")]
    bump_revision: Option<u64>,
    /// Restore at the snapshot's own revision. Kubernetes' watch caches then wait for revisions that will
    /// come back with other contents and silently miss changes: restart every kube-apiserver after it.
    #[arg(long)]
    no_bump_revision: bool,
    /// An age identity file (0600) that opens the backup, when it is encrypted and the coordinator does not
    /// hold an identity for it. Bring it for the restore only: agents never keep one.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Where the checked snapshot waits for etcd's restore tool: `memory` never writes it to disk (and
    /// saves deleting a multi-GB file afterwards), `disk` is a hidden file in the data dir; `auto` takes
    /// memory when the snapshot needs at most half of what the node (and the container's limit) leaves.
    #[arg(long, value_enum, default_value_t)]
    scratch: ScratchChoice,
}

/// Run mode. Checked by hand, not by clap: clap cannot make these required only without a subcommand.
#[derive(clap::Args, Debug)]
struct Args {
    /// Coordinator QUIC address, HOST:PORT, or every replica's: HOST:PORT,HOST:PORT,… (required).
    #[arg(long, env = "FERRY_COORDINATOR")]
    coordinator: Option<String>,
    /// Directory with ca.crt, agent.crt and agent.key, from `ferryctl agent-credentials` (required).
    #[arg(long, env = "FERRY_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// etcd client URLs; the first is this agent's own member (required).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// CA bundle for etcd's client port.
    #[arg(long)]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// TCP address for /metrics, /healthz and /readyz (off when not given).
    #[arg(long, env = "FERRY_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// TCP address for /healthz and /readyz alone, with connection caps of their own (for the kubelet's
    /// probes: a flood of the metrics port cannot fail them); off when not given.
    #[arg(long, env = "FERRY_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
    /// zstd worker threads for a backup's compression (0: one thread). More finish a backup sooner on a node
    /// with idle cores, for slightly more CPU in all; see docs/PERFORMANCE.md.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    zstd_workers: u32,
    /// Nice value of the compression threads (0-19; 0 leaves their priority alone): etcd, on the same cores,
    /// wins every contended time slice. It acts within the agent's cgroup; across containers, the pod's CPU
    /// request decides (docs/DEPLOY.md).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pipeline_nice: i32,
    /// How sensitive the read of etcd's snapshot is to etcd's latency: it starts at full speed (or the
    /// ceiling), is halved while etcd, being written to, answers slower than FACTOR × its latency before the
    /// backup (and 2 ms above it), and recovers while etcd is quiet; never below --etcd-read-floor-mibps.
    /// 0 or 1: no adapting, the read goes at the ceiling. See docs/PERFORMANCE.md.
    #[arg(long, value_name = "FACTOR", default_value_t = 2.0, value_parser = backoff_factor)]
    etcd_latency_backoff: f64,
    /// Read etcd's snapshot at most this fast, MiB/s, whatever etcd's latency allows (0: no ceiling, as fast
    /// as the pipeline goes while etcd stays fast). Raised so that no read takes over 2 minutes (a snapshot
    /// holds a read transaction open in etcd).
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    etcd_read_limit_mibps: u32,
    /// The largest etcd database, MiB, whose `HashKV` (the coordinator's check that members hold the same data)
    /// may be computed afresh: that hashes the whole key space while holding etcd's backend, stalling its
    /// writes (~3 ms per MiB of Kubernetes data). Above it only the hashes etcd 3.5.5+ keeps from its own
    /// compactions are used (Kubernetes compacts every 5 minutes). See docs/PERFORMANCE.md.
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    hashkv_scan_limit_mib: u64,
    /// Read etcd's snapshot at least this fast, MiB/s, however slow etcd answers: the snapshot holds a read
    /// transaction open in etcd until it is read. Raised so that no read takes over 2 minutes; a ceiling
    /// below it wins.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 20, value_parser = read_floor)]
    etcd_read_floor_mibps: u32,
    /// The gate's directory (`ferry-agent gate --gate-dir`, shared with etcd's container): lets the coordinator
    /// hold, restore and restart this member in an orchestrated restore. Needs --data-dir.
    #[arg(long, requires = "data_dir")]
    gate_dir: Option<PathBuf>,
    /// etcd's data dir as mounted in the agent (read-write): where a restore rebuilds the member.
    #[arg(long, requires = "gate_dir")]
    data_dir: Option<PathBuf>,
    /// The client URL etcd serves on while a restore is not verified yet: loopback, a port nothing else uses,
    /// so that no client (kube-apiserver) reaches a restored member before the whole cluster is checked.
    #[arg(long, default_value = "http://127.0.0.1:2390")]
    restore_client_url: String,
    /// Where the change-log watcher keeps sealed segments until they are stored (created 0700; emptied at
    /// the start and end of each watch). Default: `ferry-agent-spool` under the OS temp dir.
    #[arg(long, env = "FERRY_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
}

fn read_floor(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(f) if (1..=100_000).contains(&f) => Ok(f),
        _ => Err(format!(
            "`{s}` is not a floor: give MiB/s from 1 to 100000, e.g. 20 (the read never stops: etcd holds a read \
             transaction open until the snapshot is read)"
        )),
    }
}

fn backoff_factor(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f == 0.0 || (1.0..=100.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "`{s}` is not a factor: give 0 (read at the ceiling, no adapting) or a number from 1 to 100, e.g. 2"
        )),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The metrics port takes at most a fixed handful of descriptors; everything else is the daemon's work. Not
    // for the gate: etcd inherits its limits, and gets them as they were given.
    if !matches!(cli.command, Some(Command::Gate(_))) {
        match ferry_common::observe::raise_fd_limit() {
            Ok(n) => tracing::debug!(open_files = n, "file descriptor limit"),
            Err(e) => tracing::warn!("failed to raise the open-file limit: {e}"),
        }
    }
    let result = match cli.command {
        Some(Command::Restore(r)) => restore(r).await,
        Some(Command::Gate(g)) => {
            let config = ferry_agent::gate::GateConfig {
                gate_dir: g.gate_dir,
                data_dir: g.data_dir,
                stop_timeout: g.stop_timeout,
                command: g.etcd,
                start_held: g.start_held,
            };
            match ferry_agent::gate::run(config).await {
                Ok(code) => std::process::exit(code),
                // A refusal to start, like a usage error: exit 2.
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        None => run(cli.run).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let (Some(coordinator), Some(creds_dir), Some(endpoint)) =
        (args.coordinator, args.credentials, args.etcd_endpoints.first().cloned())
    else {
        anyhow::bail!(
            "--coordinator, --credentials and --etcd-endpoints are required (see --help); to restore a member, use `ferry-agent restore`"
        );
    };
    let credentials = AgentCredentials::load(&creds_dir).with_context(|| {
        format!(
            "load --credentials {} (create it with `ferryctl agent-credentials`; for an agent that does not run as root, add `--owner USER`)",
            creds_dir.display()
        )
    })?;
    let identity = Identity::from_pem(&credentials.client.cert_pem).context("read agent certificate")?;
    let Identity::Agent { cluster, member } = identity else {
        anyhow::bail!("the certificate in --credentials is not an agent certificate; create one with `ferryctl agent-credentials`");
    };
    let tls = EtcdTls { cacert: args.etcd_cacert, cert: args.etcd_cert, key: args.etcd_key };
    let etcd = EtcdMember::connect(&endpoint, &tls).await?.with_hash_scan_limit(args.hashkv_scan_limit_mib << 20);

    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signals.cancel();
    });
    if let Some(addr) = args.health_listen {
        let server =
            ferry_common::observe::listen_health(addr, Arc::new(ferry_agent::metrics::Observed), cancel.clone())
                .await
                .with_context(|| format!("listen on --health-listen {addr}"))?;
        tokio::spawn(server);
    }
    if let Some(addr) = args.metrics_listen {
        let server = listen(addr, Arc::new(ferry_agent::metrics::Observed), cancel.clone())
            .await
            .with_context(|| format!("listen on --metrics-listen {addr}"))?;
        tokio::spawn(server);
    }
    let restore = match (args.gate_dir, args.data_dir) {
        (Some(gate_dir), Some(data_dir)) => {
            check_restore_url(&args.restore_client_url)?;
            Some(ferry_agent::restore_steps::RestoreSetup {
                gate_dir,
                data_dir,
                restore_url: args.restore_client_url,
                scratch: ScratchChoice::Auto,
            })
        }
        _ => None,
    };
    let span = info_span!("agent", %cluster, %member);
    async {
        info!(%coordinator, etcd = %endpoint, "agent starting");
        let jobs_cancel = CancellationToken::new();
        let pipeline = PipelineSettings {
            zstd_workers: args.zstd_workers,
            nice: args.pipeline_nice,
            pacing: PacingSettings {
                sensitivity: args.etcd_latency_backoff,
                floor_bps: u64::from(args.etcd_read_floor_mibps) << 20,
                ceiling_bps: u64::from(args.etcd_read_limit_mibps) << 20,
            },
        };
        Link {
            coordinator,
            credentials_dir: creds_dir,
            credentials,
            etcd,
            jobs: tokio_util::task::TaskTracker::new(),
            pipeline,
            restore,
            restore_lock: Default::default(),
            spool_dir: args.spool_dir.unwrap_or_else(ferry_agent::watch::default_spool_dir),
        }
        .run(cancel, jobs_cancel)
        .await?;
        info!("agent stopped");
        Ok(())
    }
    .instrument(span)
    .await
}

/// The restore URL must keep clients away: plain `http://` on a loopback address with a port.
fn check_restore_url(url: &str) -> Result<()> {
    let rest = url.strip_prefix("http://").unwrap_or("");
    let (host, port) = rest.rsplit_once(':').unwrap_or(("", ""));
    let loopback = host == "localhost"
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback || port.parse::<u16>().map_or(true, |p| p == 0) {
        anyhow::bail!(
            "--restore-client-url {url:?} must be http://LOOPBACK:PORT (e.g. http://127.0.0.1:2390): a restored member \
             serves only there until the cluster is verified"
        );
    }
    Ok(())
}

async fn restore(a: RestoreArgs) -> Result<()> {
    // Read before anything is fetched: a bad identity file fails at once.
    let identities = a.identity.as_deref().map(ferry_common::encryption::Identities::load).transpose()?;
    let (coordinator, ca_pem, client) = match (&a.ferryconfig, &a.credentials) {
        (Some(path), _) => {
            let cfg = FerryConfig::load(path).with_context(|| format!("load --ferryconfig {}", path.display()))?;
            if a.from_cluster.is_none() {
                anyhow::bail!(
                    "with an admin --ferryconfig, name the cluster whose backup to restore: --from-cluster NAME"
                );
            }
            (a.coordinator.clone().unwrap_or_else(|| cfg.coordinator.clone()), cfg.ca.clone(), cfg.client_pem())
        }
        (None, Some(_)) if a.from_cluster.is_some() => anyhow::bail!(
            "--from-cluster needs an admin credential (--ferryconfig admin.ferryconfig): an agent's credentials restore only its own cluster"
        ),
        (None, Some(dir)) => {
            let creds = AgentCredentials::load(dir).with_context(|| format!("load --credentials {}", dir.display()))?;
            let coordinator =
                a.coordinator.clone().context("--coordinator HOST:PORT is required with --credentials")?;
            (coordinator, creds.ca_pem, creds.client)
        }
        (None, None) => anyhow::bail!("give --credentials DIR (agent) or --ferryconfig PATH (admin)"),
    };
    let member = RestoreAs {
        name: a.name,
        initial_cluster: a.initial_cluster,
        initial_cluster_token: a.initial_cluster_token,
        initial_advertise_peer_urls: a.initial_advertise_peer_urls,
    };
    let span = info_span!("restore", member = %member.name, data_dir = %a.data_dir.display());
    ferry_agent::restore::run(RestoreRequest {
        coordinator,
        ca_pem,
        client,
        from_cluster: a.from_cluster,
        backup: a.backup,
        data_dir: a.data_dir,
        member,
        force: a.force,
        scratch: a.scratch,
        identities,
        bump: match (a.bump_revision, a.no_bump_revision) {
            (_, true) => BumpChoice::Off,
            (Some(n), false) => BumpChoice::By(n),
            (None, false) => BumpChoice::Planned,
        },
    })
    .instrument(span)
    .await
}
