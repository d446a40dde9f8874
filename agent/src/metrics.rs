//! The agent's Prometheus metrics, process-wide (one agent per process). `ferry_agent_*` plus the standard
//! `process_resident_memory_bytes` and `process_cpu_seconds_total`.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabels {
    /// `success` or `error` (a part that failed for good, after its retries).
    pub result: String,
}

pub struct AgentMetrics {
    registry: Registry,
    pub etcd_read_bytes: Counter,
    pub stored_bytes: Counter,
    pub upload_parts: Family<PartLabels, Counter>,
    pub job_throughput: Gauge<f64, AtomicU64>,
    pub backoff_seconds: Counter<f64, AtomicU64>,
    pub read_rate: Gauge<f64, AtomicU64>,
    pub read_limit: Gauge<f64, AtomicU64>,
    pub coordinator_connected: Gauge,
    pub etcd_up: Gauge,
    pub changelog_revisions: Counter,
    pub changelog_segments: Counter,
    pub changelog_spool_bytes: Gauge,
    pub changelog_gaps: Counter,
    rss: Gauge,
    cpu: Counter<f64, AtomicU64>,
}

/// The process's metrics.
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

impl AgentMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            etcd_read_bytes: Counter::default(),
            stored_bytes: Counter::default(),
            upload_parts: Family::default(),
            job_throughput: Gauge::default(),
            backoff_seconds: Counter::default(),
            read_rate: Gauge::default(),
            read_limit: Gauge::default(),
            coordinator_connected: Gauge::default(),
            etcd_up: Gauge::default(),
            changelog_revisions: Counter::default(),
            changelog_segments: Counter::default(),
            changelog_spool_bytes: Gauge::default(),
            changelog_gaps: Counter::default(),
            rss: Gauge::default(),
            cpu: Counter::default(),
        };
        let agent = registry.sub_registry_with_prefix("ferry_agent");
        agent.register("etcd_read_bytes", "Snapshot bytes read from etcd", m.etcd_read_bytes.clone());
        agent.register("stored_bytes", "Compressed bytes sent to the backup store", m.stored_bytes.clone());
        agent.register("upload_parts", "S3 multipart parts uploaded, by result", m.upload_parts.clone());
        agent.register(
            "job_throughput_bytes_per_second",
            "Raw snapshot bytes per second of the running backup (0 when idle)",
            m.job_throughput.clone(),
        );
        agent.register(
            "backoff_seconds",
            "Time backups spent reading etcd's snapshot below their top rate because etcd's latency had risen",
            m.backoff_seconds.clone(),
        );
        agent.register(
            "read_rate_bytes_per_second",
            "Bytes per second read from etcd's snapshot in the running backup's last quarter second (0 when idle)",
            m.read_rate.clone(),
        );
        agent.register(
            "read_limit_bytes_per_second",
            "Limit on reading etcd's snapshot in force in the running backup, lowered while etcd is slow (0: none, or idle)",
            m.read_limit.clone(),
        );
        agent.register("coordinator_connected", "1 while linked to the coordinator", m.coordinator_connected.clone());
        agent.register("etcd_up", "1 while the agent's etcd member answers", m.etcd_up.clone());
        agent.register(
            "changelog_revisions",
            "etcd revisions the change-log watcher put into segments",
            m.changelog_revisions.clone(),
        );
        agent.register("changelog_segments", "Change-log segments sealed and spooled", m.changelog_segments.clone());
        agent.register(
            "changelog_spool_bytes",
            "Sealed change-log bytes on disk waiting to be stored",
            m.changelog_spool_bytes.clone(),
        );
        agent.register("changelog_gaps", "Gaps the change-log watcher reported", m.changelog_gaps.clone());
        registry.register("process_resident_memory_bytes", "Resident memory of this process", m.rss.clone());
        registry.register("process_cpu_seconds", "CPU time used by this process", m.cpu.clone());
        Self { registry, ..m }
    }

    pub fn part(&self, ok: bool) {
        let result = if ok { "success" } else { "error" }.to_string();
        self.upload_parts.get_or_create(&PartLabels { result }).inc();
    }

    /// OpenMetrics text, with the process figures read now.
    pub fn render(&self) -> String {
        let (rss, cpu) = ferry_common::observe::process_stats();
        self.rss.set(rss as i64);
        let delta = cpu - self.cpu.get();
        if delta > 0.0 {
            self.cpu.inc_by(delta);
        }
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            tracing::warn!("failed to encode metrics: {e}");
        }
        s
    }
}

/// `/metrics` and `/readyz` of the agent: ready while linked to the coordinator and reaching etcd.
pub struct Observed;

impl ferry_common::observe::Observed for Observed {
    fn metrics(&self) -> String {
        METRICS.render()
    }

    fn ready(&self) -> Result<(), String> {
        match (METRICS.coordinator_connected.get(), METRICS.etcd_up.get()) {
            (1, 1) => Ok(()),
            (0, _) => Err("not connected to the coordinator".into()),
            _ => Err("etcd member not reachable".into()),
        }
    }
}
