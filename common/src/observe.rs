//! What both daemons expose to operators: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready to
//! take connections) and `/leaderz` (leads: the one coordinator replica that schedules and runs backups) on
//! `--metrics-listen`, and their log format (`--log-format text|json`, level from `RUST_LOG`).
//!
//! That port is unauthenticated, so it is bounded: at most [`MAX_CONNECTIONS`] at once and
//! [`MAX_CONNECTIONS_PER_SOURCE`] from one address (more are closed as soon as they are accepted),
//! [`HEADER_TIMEOUT`] to send a request's headers, [`CONNECTION_LIFE`] in all and
//! one request per connection. With [`raise_fd_limit`] at start, a slowloris client can hold at most
//! `MAX_CONNECTIONS` descriptors: never the ones backups need.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sets up logging to stderr; the level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
}

/// What the endpoints ask the daemon.
pub trait Observed: Send + Sync + 'static {
    /// Metrics in OpenMetrics text format.
    fn metrics(&self) -> String;
    /// `Ok` when ready to serve, else why not.
    fn ready(&self) -> Result<(), String>;
    /// Whether this process leads its replica set; `None` where there is no such thing (an agent).
    fn leading(&self) -> Option<bool> {
        None
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text → the classic Prometheus text format, for clients that do not ask for OpenMetrics
/// (curl, `promtool check metrics`): counters are declared under their `_total` name, `# UNIT` and `# EOF`
/// lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

async fn metrics(headers: HeaderMap, o: Arc<dyn Observed>) -> Response {
    let text = o.metrics();
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
    } else {
        ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], to_prometheus_text(&text)).into_response()
    }
}

/// Connections the metrics port serves at once; Prometheus and kubelet probes need a handful.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections one source address may hold at once: a slowloris from one pod or host cannot take the slots
/// that kubelet's probes (from the node) and Prometheus need.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Time a client gets to send its request headers (a slowloris client is cut after this).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives, request and response included: the answers are small.
pub const CONNECTION_LIFE: Duration = Duration::from_secs(30);

/// Raises the soft limit of open files to the hard limit, so the daemon's own work (etcd, S3, QUIC, files)
/// has the whole budget the host allows; returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum || (lim.current.is_some() && lim.maximum.is_none()) {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim)?;
    }
    Ok(lim.current.unwrap_or(u64::MAX))
}

/// Binds `--metrics-listen` now, so a taken port fails start-up, and returns the server to spawn; it serves
/// until `cancel` fires and logs if it fails.
pub async fn listen(
    addr: SocketAddr,
    observed: Arc<dyn Observed>,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    bind(addr, observed, cancel, true).await
}

/// Binds `--health-listen`: `/healthz`, `/readyz` and `/leaderz` only, with connection caps of their own, so
/// that a flood of the metrics port (from many addresses, which its per-source cap does not stop) never
/// fails the kubelet's probes and restarts the daemon. Serves until `cancel` fires.
pub async fn listen_health(
    addr: SocketAddr,
    observed: Arc<dyn Observed>,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    bind(addr, observed, cancel, false).await
}

async fn bind(
    addr: SocketAddr,
    observed: Arc<dyn Observed>,
    cancel: CancellationToken,
    with_metrics: bool,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(async move {
        if let Err(e) = serve(listener, observed, cancel, with_metrics).await {
            tracing::warn!(%addr, "failed to serve the metrics or health port: {e}");
        }
    })
}

async fn serve(
    listener: tokio::net::TcpListener,
    observed: Arc<dyn Observed>,
    cancel: CancellationToken,
    with_metrics: bool,
) -> std::io::Result<()> {
    let m = observed.clone();
    let r = observed.clone();
    let l = observed.clone();
    let app = Router::new();
    let app = if with_metrics { app.route("/metrics", get(move |h: HeaderMap| metrics(h, m.clone()))) } else { app };
    let app = app
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    // A follower is ready too (it takes connections and redirects them); the body says which.
                    let role = match r.leading() {
                        Some(true) => " (leader)",
                        Some(false) => " (follower: redirects clients to the leader)",
                        None => "",
                    };
                    match r.ready() {
                        Ok(()) => (StatusCode::OK, format!("ok{role}\n")),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                    }
                }
            }),
        )
        .route(
            "/leaderz",
            get(move || {
                let l = l.clone();
                async move {
                    match (l.ready(), l.leading()) {
                        (Err(why), _) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                        (Ok(()), Some(true) | None) => (StatusCode::OK, "leader\n".to_string()),
                        (Ok(()), Some(false)) => {
                            (StatusCode::SERVICE_UNAVAILABLE, "follower: another replica leads\n".to_string())
                        }
                    }
                }
            }),
        );
    if with_metrics {
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz and /leaderz");
    } else {
        tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /leaderz (health port)");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_source = PerSource::default();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = cancel.cancelled() => break,
        };
        let (stream, source) = match accepted {
            Ok((stream, peer)) => (stream, peer.ip()),
            Err(e) => {
                // EMFILE and the like: back off instead of spinning; the daemon's other work goes on.
                tracing::warn!("failed to accept on the metrics port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over a cap: closed at once, so the descriptor is back within microseconds. The source's cap first: a
        // flood from one address does not take the shared slots.
        let Some(from_source) = per_source.take(source) else { continue };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let (_permit, _from_source) = (permit, from_source);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFE, conn).await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
    Ok(())
}

/// Open connections per source address, capped at [`MAX_CONNECTIONS_PER_SOURCE`].
#[derive(Clone, Default)]
struct PerSource(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

/// One connection counted against its source; released on drop.
struct SourceSlot(PerSource, std::net::IpAddr);

impl PerSource {
    fn take(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), ip))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C: where both daemons begin their ordered shutdown.
pub async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The process's resident memory (bytes) and CPU time (seconds), from /proc.
pub fn process_stats() -> (u64, f64) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096);
    // utime and stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_converts_to_classic_text() {
        let om = "# HELP ferry_backups Backups.\n# TYPE ferry_backups counter\nferry_backups_total{cluster=\"a\"} 3\n# HELP ferry_x X.\n# TYPE ferry_x gauge\n# UNIT ferry_x seconds\nferry_x 1.0\n# EOF\n";
        let t = to_prometheus_text(om);
        assert!(
            t.contains("# TYPE ferry_backups_total counter\n") && t.contains("# HELP ferry_backups_total Backups.\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE ferry_x gauge\n") && !t.contains("EOF") && !t.contains("UNIT"), "{t}");
        let (rss, _cpu) = process_stats();
        assert!(rss > 0);
    }
}
