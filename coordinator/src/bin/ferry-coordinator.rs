//! `ferry-coordinator`: parses flags, opens the state dir and wires the QUIC server to the stores.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use ferry_common::tls::quinn_server_config;
use ferry_coordinator::coordinator::{Coordinator, Settings};
use ferry_coordinator::local_store::LocalStore;
use ferry_coordinator::state::RedbStore;
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
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.backup_store == StoreKind::S3 {
        bail!("--backup-store s3 is not available in this version; use --backup-store local");
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("create --state-dir {}", args.state_dir.display()))?;
    let state = RedbStore::open(&args.state_dir.join("state.redb"))
        .context("open the state store (is another coordinator using this --state-dir?)")?;
    let pki = ferry_coordinator::pki::init(&args.state_dir, args.listen, &args.advertise_names)?;
    let store_dir = args.local_store_dir.clone().unwrap_or_else(|| args.state_dir.join("backups"));
    let store = LocalStore::open(&store_dir)?;
    let server_config = quinn_server_config(&pki.ca.pem().cert_pem, &pki.server)?;
    let settings = Settings { zstd_level: args.zstd_level, store_name: "local".into() };
    let coord = Coordinator::new(Arc::new(state), store, pki.ca, settings)?;

    let endpoint = quinn::Endpoint::server(server_config, args.listen)
        .with_context(|| format!("listen on {} (UDP)", args.listen))?;
    info!(listen = %args.listen, store = %store_dir.display(), "coordinator ready");
    let server = tokio::spawn(ferry_coordinator::server::serve(coord.clone(), endpoint.clone()));

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

async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
