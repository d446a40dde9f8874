//! `ferry-agent`: parses flags and wires the coordinator link to the etcd member.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ferry_agent::etcd::{EtcdMember, EtcdTls};
use ferry_agent::link::Link;
use ferry_common::config::AgentCredentials;
use ferry_common::tls::Identity;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

/// Ferry agent: backs up the etcd member it runs beside, on the coordinator's command.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Coordinator QUIC address, HOST:PORT.
    #[arg(long, env = "FERRY_COORDINATOR")]
    coordinator: String,
    /// Directory with ca.crt, agent.crt and agent.key (from `ferryctl agent-credentials`).
    #[arg(long, env = "FERRY_CREDENTIALS")]
    credentials: PathBuf,
    /// etcd client URLs; the first is this agent's own member.
    #[arg(long, value_delimiter = ',', required = true)]
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
    let credentials = AgentCredentials::load(&args.credentials).with_context(|| {
        format!("load --credentials {} (create it with `ferryctl agent-credentials`)", args.credentials.display())
    })?;
    let identity = Identity::from_pem(&credentials.client.cert_pem).context("read agent certificate")?;
    let Identity::Agent { cluster, member } = identity else {
        anyhow::bail!("the certificate in --credentials is not an agent certificate; create one with `ferryctl agent-credentials`");
    };
    let endpoint = &args.etcd_endpoints[0];
    let tls = EtcdTls { cacert: args.etcd_cacert, cert: args.etcd_cert, key: args.etcd_key };
    let etcd = EtcdMember::connect(endpoint, &tls).await?;

    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signals.cancel();
    });
    let span = info_span!("agent", %cluster, %member);
    async {
        info!(coordinator = %args.coordinator, etcd = %endpoint, "agent starting");
        Link { coordinator: args.coordinator, credentials, etcd }.run(cancel).await?;
        info!("agent stopped");
        Ok(())
    }
    .instrument(span)
    .await
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
